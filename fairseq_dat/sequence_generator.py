"""Exit-aware beam search: fairseq's ``SequenceGenerator`` with per-hypothesis exits.

The search loop is fairseq's own (prefixes, constraints, length penalty, ``--nbest`` … come free).
What changes, following ``SequenceGeneratorWithAlignment``'s pattern:
- ``_generate`` hands the exit policy to the decoder(s) for the duration of one batch;
- the decoder's incremental step decides each row's exit and runs each block only for the rows
  still running (:mod:`fairseq_dat.modules.exit_aware_decoding`); its exit history lives in the
  incremental state, so fairseq's beam reordering carries it with the hypotheses;
- ``finalize_hypos`` attaches each finished hypothesis' per-token exits (``hypo["exits"]``, 1-based).

One model only: exits are decided per model, so an ensemble (``--path a.pt:b.pt``) is refused.
``autocast_bf16`` (``--autocast-bf16``) decodes each batch under ``torch.autocast(bfloat16)``: matrix
products in bfloat16 on the float32 weights, log-probabilities and beam scores in float32.
"""
from typing import Dict, List, Optional

import torch
from torch import Tensor
from fairseq.sequence_generator import EnsembleModel, SequenceGenerator

from .errors import ConfigError
from .exit_policy import ExitStats, build_exit_policy
from .modules.exit_aware_decoding import LeanBufferPool
from .precision import bf16_autocast


class AdaptiveEnsembleModel(EnsembleModel):
    """Remembers the current incremental states so the generator can read the exit history."""

    def __init__(self, models):
        super().__init__(models)
        self.incremental_states = None
        self.stats: Optional[ExitStats] = None
        self.next_encoder_outs = None  # computed by the generator before the batch (sorted by depth)

    def forward_encoder(self, net_input: Dict[str, Tensor]):
        if self.next_encoder_outs is not None:
            encoder_outs, self.next_encoder_outs = self.next_encoder_outs, None
            return encoder_outs
        return super().forward_encoder(net_input)

    def forward_decoder(self, tokens, encoder_outs, incremental_states, temperature: float = 1.0):
        self.incremental_states = incremental_states
        decoder = self.single_model.decoder
        if decoder.exit_policy is None and self.stats is not None:  # full depth: every row runs N blocks
            self.stats.add_rows(torch.full((tokens.size(0),), decoder.num_layers, dtype=torch.long))
        return super().forward_decoder(tokens, encoder_outs, incremental_states, temperature)

    def exit_history(self) -> Optional[Tensor]:
        """rows x steps exits (1-based), or None when fairseq's own decoder runs (full depth)."""
        if self.incremental_states is None:
            return None
        return self.single_model.decoder.exit_history(self.incremental_states[0])


class AdaptiveSequenceGenerator(SequenceGenerator):
    def __init__(self, models, tgt_dict, exit_strategy: str = "auto", exit_threshold=None,
                 fixed_exit: Optional[int] = None, exit_gather_ratio: Optional[float] = None,
                 exit_kv: Optional[str] = None, decoder_step: Optional[str] = None,
                 exit_sequence_order: Optional[str] = None, autocast_bf16: bool = False, **kwargs):
        if len(models) > 1:
            raise ConfigError(f"--path: ensembles are not supported by the exit-aware generator (got {len(models)} "
                              "models); decode with one checkpoint, or average them first")
        super().__init__(AdaptiveEnsembleModel(models), tgt_dict, **kwargs)
        self.autocast_bf16 = bool(autocast_bf16)
        decoder = self.model.single_model.decoder
        self.num_exits = decoder.num_layers
        self.stats = ExitStats(self.num_exits)
        self.model.stats = self.stats
        # built (and validated) once, before any decoding
        self.policy = build_exit_policy(decoder, exit_strategy, exit_threshold, fixed_exit, self.stats,
                                        exit_gather_ratio, exit_kv, decoder_step, exit_sequence_order)

    def _generate(self, sample: Dict[str, Dict[str, Tensor]], prefix_tokens: Optional[Tensor] = None,
                  constraints: Optional[Tensor] = None, bos_token: Optional[int] = None):
        decoders = [m.decoder for m in self.model.models]
        if getattr(self.policy, "needs_reference", False):
            if sample.get("target") is None:
                raise ConfigError("--exit-strategy oracle needs reference translations (a binarized test "
                                  "set with targets, as fairseq-generate reads; not fairseq-interactive)")
            self.policy.reference = sample["target"]
        steps = self.decoding_steps(sample)
        pool = self.lean_pool
        for decoder in decoders:
            decoder.exit_policy = self.policy
            decoder.beam_rows = self.beam_size  # fairseq's search keeps a sentence's beam rows together
            decoder.lean_capacity = steps
            decoder.lean_pool = pool
        try:
            with bf16_autocast(self.model.single_model, self.autocast_bf16):
                finalized, order = self.decode_batch(sample, prefix_tokens, constraints, bos_token)
        finally:
            for decoder in decoders:
                decoder.exit_policy = None
                decoder.beam_rows = 1
                decoder.lean_capacity = None
                decoder.lean_pool = None
            self.model.incremental_states = None
            pool.reclaim()  # the batch's caches are gone with its incremental states
            self.model.next_encoder_outs = None
            if hasattr(self.policy, "sorted_depths"):
                self.policy.sorted_depths = None
        if order is not None:  # back to the batch's order
            finalized = in_batch_order(finalized, order)
        for hypos in finalized:
            if hypos:
                self.stats.add_hypothesis(hypos[0]["exits"])
        return finalized

    @property
    def lean_pool(self) -> LeanBufferPool:
        """The lean step's key/value buffers, reused batch after batch (one pool per thread)."""
        return LeanBufferPool.for_this_thread()

    def decode_batch(self, sample, prefix_tokens, constraints, bos_token):
        """fairseq's beam search on the batch, deepest sentences first when the policy sorts them →
        (hypotheses in the order decoded, that order or None)."""
        order = None
        if getattr(self.policy, "sorts_sentences", False) and self.model.has_encoder():
            order = self.sort_sentences_by_depth(sample["net_input"])
            sample, prefix_tokens, constraints = (permute_sample(sample, order), select_rows(prefix_tokens, order),
                                                  select_rows(constraints, order))
        finalized = super()._generate(sample, prefix_tokens=prefix_tokens, constraints=constraints,
                                      bos_token=bos_token)
        return finalized, order

    def sort_sentences_by_depth(self, net_input) -> Tensor:
        """Sequence-level depths (paper §3.1): the encoder runs once here, the estimator decides every
        sentence's depth, and the batch is decoded deepest first (the encoder output, reordered, is what
        ``_generate`` then receives), so that the rows reaching block n are the leading ones."""
        encoder_outs = self.model.forward_encoder(net_input)
        decoder, encoder = self.model.single_model.decoder, self.model.single_model.encoder
        order = self.policy.sort_batch(decoder, encoder_outs[0])
        self.model.next_encoder_outs = [encoder.reorder_encoder_out(encoder_outs[0], order)]
        return order

    def decoding_steps(self, sample) -> int:
        """How many positions the lean step's key/value buffers get at the start of this batch: the most
        steps ``_generate`` can run (its ``max_len`` + 1, fairseq's formula), capped at twice the source
        length + 8 (fairseq-generate's default ``--max-len-b 200`` would otherwise reserve 201 positions
        per block for 20-token sentences). A size hint only: the buffers double if decoding goes longer."""
        net_input = sample["net_input"]
        source = net_input.get("src_tokens", net_input.get("source"))
        if self.match_source_len and "src_lengths" in net_input:
            return int(net_input["src_lengths"].max()) + 1
        steps = min(int(self.max_len_a * source.size(1) + self.max_len_b), self.max_len - 1) + 1
        return min(steps, 2 * source.size(1) + 8)

    def finalize_hypos(self, step, bbsz_idx, eos_scores, tokens, scores, finalized: List[List[Dict[str, Tensor]]],
                       finished: List[bool], beam_size: int, attn: Optional[Tensor], src_lengths, max_len: int):
        sentences = sentences_of_rows(bbsz_idx, finished, beam_size)  # before super marks sentences finished
        counts = [len(hypos) for hypos in finalized]
        newly_finished = super().finalize_hypos(step, bbsz_idx, eos_scores, tokens, scores, finalized, finished,
                                                beam_size, attn, src_lengths, max_len)
        history = self.model.exit_history()  # None: full depth through fairseq's own decoder path
        for row, sent in zip(bbsz_idx.tolist(), sentences):
            if counts[sent] < beam_size:  # the condition under which super() appended this hypothesis
                exits = (history[row, : step + 1].clone() if history is not None
                         else torch.full((step + 1,), self.num_exits, dtype=torch.long))
                finalized[sent][counts[sent]]["exits"] = exits
                counts[sent] += 1
        return newly_finished


def sentences_of_rows(bbsz_idx: Tensor, finished: List[bool], beam_size: int) -> List[int]:
    """Original sentence index of each finished row; mirrors the ``cum_unfin`` bookkeeping of
    ``SequenceGenerator.finalize_hypos`` (sentences already finished were removed from the batch)."""
    unfinished = [i for i, done in enumerate(finished) if not done]
    return [unfinished[row // beam_size] for row in bbsz_idx.tolist()]


def in_batch_order(finalized: List[List[Dict[str, Tensor]]], order: Tensor) -> List[List[Dict[str, Tensor]]]:
    """The hypotheses of sentences decoded in ``order`` (position i = sentence order[i]), back in the
    batch's order."""
    unsorted: List[List[Dict[str, Tensor]]] = [[] for _ in finalized]
    for position, sentence in enumerate(order.tolist()):
        unsorted[sentence] = finalized[position]
    return unsorted


def select_rows(t: Optional[Tensor], order: Tensor) -> Optional[Tensor]:
    return None if t is None else t.index_select(0, order.to(t.device))


def permute_sample(sample, order: Tensor):
    """A copy of ``sample`` with its sentences in ``order`` (every per-sentence tensor of the
    batch; the caller's sample is left as it is)."""
    bsz = order.numel()

    def permuted(value):
        if isinstance(value, Tensor) and value.dim() > 0 and value.size(0) == bsz:
            return select_rows(value, order)
        if isinstance(value, dict):
            return {k: permuted(v) for k, v in value.items()}
        return value

    return permuted(sample)
