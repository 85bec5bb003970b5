"""The anytime decoder of the Depth-Adaptive Transformer (Elbayad et al., ICLR 2020, §2).

A fairseq ``TransformerModel`` whose decoder can emit a prediction after any of its N blocks:
an output classifier C_n sits after every block n (§2.1, p(y_{t+1} | h_t^n) = softmax(W_n h_t^n)).

Conventions used throughout the package:
- exits are **1-based** block numbers (1..N), as in the paper's average exit (AE);
- "exit state" h^n is the output of block n, passed through the final layer norm the block stack
  would have had (pre-norm architectures get one LayerNorm per exit) and ``project_out_dim``;
- the **copy rule** (§2.2.1, App. B): when token t exits at block n < N, its block-n state is
  copied to blocks n+1..N, so later tokens' self-attention at those blocks reads keys/values
  computed from the copy by each block's own k/v projections.

Called the standard fairseq way, the model returns the last exit's logits, so fairseq's own
generator, scorer and hub interface work unchanged. ``extra["exit_states"]`` holds the N exit
states (B x T x C) for the multi-exit criterion; ``extra["depth_log_q"]`` the depth estimator's
log-probabilities (see :mod:`fairseq_dat.modules.depth_estimators`).
"""
import logging
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fairseq import checkpoint_utils
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import (
    TransformerConfig,
    TransformerDecoderBase,
    TransformerModel,
    base_architecture,
)
from fairseq.models.transformer.transformer_legacy import transformer_wmt_en_de_big
from fairseq.modules import LayerNorm, MultiheadAttention

from ..checks import check_embedding_sizes
from ..errors import ConfigError
from ..modules.depth_estimators import DEPTH_ESTIMATORS, build_depth_estimator

logger = logging.getLogger(__name__)

EXIT_CLASSIFIERS = ("separate", "shared")
ESTIMATOR_CHOICES = ("none", "confidence") + tuple(DEPTH_ESTIMATORS)
# parameter-name prefixes that a checkpoint of a plain transformer (or a stage-1 model) may lack
ADAPTIVE_PARAM_PREFIXES = ("decoder.exit_projections.", "decoder.exit_layer_norms.", "decoder.depth_estimator.")


def scale_gradient(x: Tensor, gamma: float) -> Tensor:
    """SCALE_GRADIENT(x, γ) = γx + (1−γ)·stopgrad(x) (paper, Appendix A): identity forward,
    gradient multiplied by γ backward."""
    return gamma * x + (1.0 - gamma) * x.detach()


@register_model("adaptive_transformer")
class AdaptiveTransformerModel(TransformerModel):
    """Transformer with an exit classifier after every decoder block and an optional depth
    estimator (paper §2–3). See the module docstring for conventions."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        parser.add_argument("--exit-classifiers", choices=EXIT_CLASSIFIERS,
                            help="one output classifier per decoder block (separate, the paper's IWSLT "
                                 "setting) or one shared by all blocks (shared, WMT; tied to the decoder "
                                 "embeddings when --share-decoder-input-output-embed is set) (§2.1)")
        parser.add_argument("--depth-estimator", choices=ESTIMATOR_CHOICES,
                            help="how many blocks to run (§3): sequence (Seq-multinomial), "
                                 "token-multinomial, token-geometric (geometric-like halting), "
                                 "sequence-poisson-binomial, token-poisson-binomial, confidence "
                                 "(no parameters: max-probability thresholding) or none")
        parser.add_argument("--separate-halting", action="store_true",
                            help="token-geometric: one halting vector per block instead of one shared")
        parser.add_argument("--detach-estimator", action="store_true",
                            help="stop the depth-estimator loss at the estimator's inputs (the paper "
                                 "back-propagates it into encoder and decoder: default off)")
        parser.add_argument("--init-from-transformer", metavar="PATH",
                            help="initialize the trunk from a checkpoint of fairseq's stock transformer "
                                 "of the same dimensions; new exit classifiers start as copies of its "
                                 "output projection")
        parser.add_argument("--freeze-trunk", action="store_true",
                            help="train only the exit classifiers and the depth estimator")

    @classmethod
    def build_model(cls, args, task):
        adaptive_base_architecture(args)
        model = super().build_model(args, task)
        model.decoder.build_exits(args)
        if getattr(args, "init_from_transformer", None):
            model.init_trunk_from(args.init_from_transformer)
        if getattr(args, "freeze_trunk", False):
            model.freeze_trunk()
        return model

    @classmethod
    def build_decoder(cls, cfg, tgt_dict, embed_tokens):
        cfg = TransformerConfig.from_namespace(cfg)
        return AdaptiveTransformerDecoder(cfg, tgt_dict, embed_tokens, no_encoder_attn=cfg.no_cross_attention)

    def forward(self, src_tokens, src_lengths, prev_output_tokens, return_all_hiddens: bool = True,
                features_only: bool = False, alignment_layer: Optional[int] = None,
                alignment_heads: Optional[int] = None, exits: Optional[Tensor] = None):
        """As ``TransformerModel.forward``; ``exits`` (B x T, 1-based) runs the decoder teacher-forced
        with a given exit per token and the copy rule (mixed training, §2.2)."""
        encoder_out = self.encoder(src_tokens, src_lengths=src_lengths, return_all_hiddens=return_all_hiddens)
        return self.decoder(prev_output_tokens, encoder_out=encoder_out, features_only=features_only,
                            alignment_layer=alignment_layer, alignment_heads=alignment_heads,
                            src_lengths=src_lengths, exits=exits)

    # ---- loading checkpoints that lack the adaptive parameters -----------------------------

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """Loads a full adaptive checkpoint as usual. A checkpoint without exit classifiers or depth
        estimator (fairseq's stock transformer, or a stage-1 model for the estimator stage, e.g. via
        ``--finetune-from-model``) keeps this model's fresh values for the missing parameters, and a
        log line names them."""
        check_embedding_sizes(self, state_dict)  # other dictionaries: ConfigError naming the dict file
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict and k.startswith(ADAPTIVE_PARAM_PREFIXES)]
        if missing:
            state_dict = dict(state_dict)
            trunk_head = state_dict.get("decoder.output_projection.weight")
            for key in missing:
                state_dict[key] = own[key]
                if key.startswith("decoder.exit_projections.") and trunk_head is not None:
                    state_dict[key] = trunk_head.clone()
            logger.info("adaptive_transformer: %d parameter tensors not in the checkpoint were newly "
                        "initialized: %s", len(missing), ", ".join(missing))
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    def init_trunk_from(self, path: str):
        """``--init-from-transformer``: load a stock ``transformer`` checkpoint into the trunk."""
        try:
            state = checkpoint_utils.load_checkpoint_to_cpu(path)
        except (OSError, FileNotFoundError) as err:
            raise ConfigError(f"--init-from-transformer: cannot read checkpoint {path}: {err}") from err
        try:
            self.load_state_dict(state["model"], strict=True)
        except ConfigError as err:
            raise ConfigError(f"--init-from-transformer {path}: {err}") from None
        except RuntimeError as err:
            first = str(err).strip().splitlines()
            raise ConfigError(f"--init-from-transformer: {path} does not match this architecture "
                             f"({first[1].strip() if len(first) > 1 else first[0]})") from err
        logger.info("adaptive_transformer: trunk initialized from %s", path)

    def freeze_trunk(self):
        """``--freeze-trunk``: only exit classifiers and depth estimator keep requires_grad."""
        for name, param in self.named_parameters():
            param.requires_grad = name.startswith(ADAPTIVE_PARAM_PREFIXES)
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        logger.info("adaptive_transformer: trunk frozen, %d trainable parameters", trainable)


class AdaptiveTransformerDecoder(TransformerDecoderBase):
    """``TransformerDecoderBase`` with an exit after every block.

    Training reuses fairseq's ``extract_features`` (its ``inner_states`` are every block's output).
    Only two paths need their own block loop: teacher forcing with a given exit per token
    (``exits``), and incremental decoding under an exit policy (set by the exit-aware generator
    as ``self.exit_policy``), which runs each block only for the rows that still need it.
    """

    def build_exits(self, args):
        """Exit classifiers C_1..C_{N-1} (C_N is fairseq's ``output_projection``) and the depth
        estimator (§2.1, §3). Called once by ``AdaptiveTransformerModel.build_model``."""
        n = self.num_layers
        self.exit_classifiers = args.exit_classifiers
        self.exit_layer_norms = nn.ModuleList(
            [LayerNorm(self.embed_dim) for _ in range(n - 1)] if self.layer_norm is not None else [])
        self.exit_projections = nn.ModuleList()
        if args.exit_classifiers == "separate":
            if self.adaptive_softmax is not None:
                raise ConfigError("--exit-classifiers separate does not support --adaptive-softmax-cutoff")
            for _ in range(n - 1):
                proj = nn.Linear(self.output_embed_dim, len(self.dictionary), bias=False)
                nn.init.normal_(proj.weight, mean=0, std=self.output_embed_dim ** -0.5)
                self.exit_projections.append(proj)
        name = args.depth_estimator
        self.depth_estimator_name = name
        self.detach_estimator = bool(getattr(args, "detach_estimator", False))
        self.depth_estimator = None
        if name in DEPTH_ESTIMATORS:
            if n < 2:
                raise ConfigError(f"--depth-estimator {name} needs at least 2 decoder layers")
            input_dim = args.encoder_embed_dim if DEPTH_ESTIMATORS[name].inputs == "encoder" else self.embed_dim
            self.depth_estimator = build_depth_estimator(name, input_dim, n, args.separate_halting)
        self.exit_policy = None

    # ---- exits -----------------------------------------------------------------------------

    def exit_features(self, state: Tensor, n: int) -> Tensor:
        """Block-n output (any layout, channels last) → the input of classifier C_n."""
        norm = self.layer_norm if n == self.num_layers else (
            self.exit_layer_norms[n - 1] if len(self.exit_layer_norms) else None)
        if norm is not None:
            state = norm(state)
        if self.project_out_dim is not None:
            state = self.project_out_dim(state)
        return state

    def exit_projection(self, n: int) -> nn.Module:
        if n == self.num_layers or self.exit_classifiers == "shared":
            return self.output_projection
        return self.exit_projections[n - 1]

    def exit_logits(self, state: Tensor, n: int) -> Tensor:
        """C_n(h^n): logits over the vocabulary from the raw block-n output."""
        return self.exit_projection(n)(self.exit_features(state, n))

    def logits_at_exits(self, states: Tensor, exits: Tensor) -> Tensor:
        """(..., C) final states with the copy rule applied, (...) 1-based exits → (..., V) logits,
        each position projected by its own exit's classifier (once per position)."""
        present, counts = torch.unique(exits, return_counts=True)
        if present.numel() == 1:
            return self.exit_logits(states, int(present[0]))
        # every position through the most frequent exit's classifier (no gather/scatter of the bulk of
        # the V-wide logits), then the other exits' positions overwritten
        common = int(present[counts.argmax()])
        out = self.exit_logits(states, common)
        for n in present.tolist():
            if n != common:
                where = exits == n
                out[where] = self.exit_logits(states[where], n).to(out.dtype)
        return out

    # ---- forward -------------------------------------------------------------------------------

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, features_only=False,
                full_context_alignment=False, alignment_layer=None, alignment_heads=None,
                src_lengths=None, return_all_hiddens=False, exits: Optional[Tensor] = None,
                grad_scale: Optional[float] = None):
        """Standard contract: (last-exit logits B x T x V, extra). See the class docstring for
        ``exits``; ``grad_scale`` applies SCALE_GRADIENT between blocks (Appendix A)."""
        if incremental_state is not None and (self.exit_policy is not None or exits is not None):
            return self.forward_incremental_with_exits(prev_output_tokens, encoder_out, incremental_state, exits)
        if exits is not None or grad_scale is not None:
            states, pad_mask = self.teacher_forced_block_states(prev_output_tokens, encoder_out, exits, grad_scale)
            extra = {"attn": [None], "inner_states": None}
            if exits is not None:
                final = states[-1].transpose(0, 1)
                return self.logits_at_exits(final, exits), extra
            x = self.exit_features(states[-1], self.num_layers).transpose(0, 1)
            extra["exit_states"] = [s.transpose(0, 1) for s in states]
            extra["depth_log_q"] = self.depth_log_q(encoder_out, extra["exit_states"])
            return (x if features_only else self.output_layer(x)), extra
        x, extra = super().forward(prev_output_tokens, encoder_out=encoder_out, incremental_state=incremental_state,
                                   features_only=features_only, full_context_alignment=full_context_alignment,
                                   alignment_layer=alignment_layer, alignment_heads=alignment_heads)
        if incremental_state is None:
            extra["exit_states"] = [s.transpose(0, 1) for s in extra["inner_states"][1:]]
            extra["depth_log_q"] = self.depth_log_q(encoder_out, extra["exit_states"])
        return x, extra

    def depth_log_q(self, encoder_out, block_states: List[Tensor]) -> Optional[Tensor]:
        """log q over the N depths: B x N (sequence estimators) or B x T x N (token ones)."""
        if self.depth_estimator is None:
            return None
        enc, enc_mask = _encoder_tensors(encoder_out)
        if self.detach_estimator:
            enc = enc.detach() if enc is not None else None
            block_states = [s.detach() for s in block_states]
        return self.depth_estimator.log_q_from(encoder_out=enc, encoder_padding_mask=enc_mask,
                                               block_states=block_states)

    def embed_target(self, prev_output_tokens, incremental_state=None):
        """Token + position embeddings, T x B x C, and the self-attention padding mask; mirrors the
        lines of ``TransformerDecoderBase.extract_features_scriptable`` before its block loop."""
        positions = None
        if self.embed_positions is not None:
            positions = self.embed_positions(prev_output_tokens, incremental_state=incremental_state)
        if incremental_state is not None:
            prev_output_tokens = prev_output_tokens[:, -1:]
            if positions is not None:
                positions = positions[:, -1:]
        prev_output_tokens = prev_output_tokens.contiguous()
        x = self.embed_scale * self.embed_tokens(prev_output_tokens)
        if self.quant_noise is not None:
            x = self.quant_noise(x)
        if self.project_in_dim is not None:
            x = self.project_in_dim(x)
        if positions is not None:
            x += positions
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = self.dropout_module(x).transpose(0, 1)
        pad_mask = None
        if self.cross_self_attention or prev_output_tokens.eq(self.padding_idx).any():
            pad_mask = prev_output_tokens.eq(self.padding_idx)
        return x, pad_mask

    def teacher_forced_block_states(self, prev_output_tokens, encoder_out, exits=None, grad_scale=None):
        """All N block outputs (each T x B x C) under teacher forcing. With ``exits`` (B x T,
        1-based), the copy rule: after block n, positions with exit < n keep their previous state,
        so block n' > n computes its keys/values from the copy (§2.2, mixed training)."""
        enc, enc_mask = _encoder_tensors(encoder_out)
        x, pad_mask = self.embed_target(prev_output_tokens)
        keep = exits.t().unsqueeze(-1) if exits is not None else None  # T x B x 1
        states = []
        for n, layer in enumerate(self.layers, start=1):
            if grad_scale is not None and n > 1:
                x = scale_gradient(x, grad_scale)
            out, _, _ = layer(x, enc, enc_mask, None, self_attn_mask=self.buffered_future_mask(x),
                              self_attn_padding_mask=pad_mask)
            x = out if keep is None else torch.where(keep >= n, out, x)
            states.append(x)
        return states, pad_mask

    # ---- incremental decoding with exits (the generator's path) ------------------------------

    def forward_incremental_with_exits(self, prev_output_tokens, encoder_out, incremental_state, exits=None,
                                       gather_ratio: Optional[float] = None, kv_mode: Optional[str] = None):
        """One decoding step where each row (beam hypothesis) stops at its own block.

        Rows that exited are not computed by deeper blocks; each deeper block only receives the
        keys/values of their copied state (FS = 4 d² per skipped block, App. B). Blocks that no row
        reaches at this step are not touched at all with ``kv_mode="deferred"`` (the default): their
        keys/values for this position are computed from the copied state only when a later token
        runs the block (:meth:`materialize_pending_kv`), or never. ``"eager"`` appends them at once.
        The block-n exit of each row is decided by ``self.exit_policy`` (or taken from ``exits``,
        B x T or B, for tests). Returns (B x 1 x V logits, extra) with ``extra["exits"]`` (B,).
        """
        from ..exit_policy import ForcedExits  # local: the policy module imports this one

        policy = (self.exit_policy if exits is None
                  else ForcedExits(exits, gather_ratio=gather_ratio, kv_mode=kv_mode))
        deferred = policy.kv_mode == "deferred"
        enc, enc_mask = _encoder_tensors(encoder_out)
        x, pad_mask = self.embed_target(prev_output_tokens, incremental_state)
        bsz, n_layers = x.size(1), self.num_layers
        step_exits = torch.full((bsz,), n_layers, dtype=torch.long, device=x.device)
        active = torch.arange(bsz, device=x.device)
        ready_logits: Dict[int, Tensor] = {}
        attn = None
        plan = policy.plan_step(self, encoder_out, incremental_state, prev_output_tokens)
        for n, layer in enumerate(self.layers, start=1):
            if deferred and active.numel() == 0:
                break  # blocks n..N: keys/values from the copied state when a later token needs them
            if deferred:
                self.catch_up_block(n - 1, layer, incremental_state)
            x, block_attn = self.run_block_for_rows(layer, n, x, active, enc, enc_mask, incremental_state,
                                                    pad_mask, policy.gather_ratio)
            if n == n_layers:  # fairseq's alignment: the last block's source attention (None if skipped)
                attn = block_attn
            if n == n_layers or active.numel() == 0:
                continue
            stop, logits = policy.halt(self, n, x[0].index_select(0, active) if active.numel() < bsz else x[0],
                                       active, plan)
            if stop is not None and bool(stop.any()):
                rows = active[stop]
                step_exits[rows] = n
                if logits is not None:
                    ready_logits[n] = (rows, logits[stop])
                active = active[~stop]
        out = self.step_logits(x[0], step_exits, ready_logits)
        self.record_step_exits(incremental_state, step_exits, x[0] if deferred else None)
        policy.count(step_exits)
        return out.unsqueeze(1), {"attn": [attn], "inner_states": None, "exits": step_exits}

    def run_block_for_rows(self, layer, n, x, active, enc, enc_mask, incremental_state, pad_mask,
                           gather_ratio: float = 0.5):
        """Block n for the rows in ``active`` (indices); the others keep their state (copy rule) and
        only get this block's self-attention keys/values appended from it.

        Three ways, chosen per call: all rows active → fairseq's layer call, unchanged (bitwise the
        stock computation); many rows active (≥ ``gather_ratio``) or the block's source keys/values
        not yet computed (the paper's FirstCall) → the layer on every row, exited rows' outputs
        discarded (their keys/values are already the copies'); few rows → the layer on a sub-batch
        gathered with its caches, and the exited rows' keys/values from one batched projection.
        """
        bsz, n_active = x.size(1), active.numel()
        last = n == self.num_layers
        if n_active == bsz:
            out, attn, _ = layer(x, enc, enc_mask, incremental_state, self_attn_padding_mask=pad_mask,
                                 need_attn=last, need_head_weights=last)
            return out, (attn.float().mean(dim=0) if attn is not None else None)
        if n_active == 0:
            self.append_copied_kv(layer, x, incremental_state)
            return x, None
        if n_active >= gather_ratio * bsz:
            out, _, _ = layer(x, enc, enc_mask, incremental_state, self_attn_padding_mask=pad_mask)
            mask = torch.zeros(bsz, dtype=torch.bool, device=x.device)
            mask[active] = True
            return torch.where(mask.view(1, bsz, 1), out, x), None
        if layer.encoder_attn is not None and "prev_key" not in layer.encoder_attn._get_input_buffer(incremental_state):
            self.cache_source_kv(layer.encoder_attn, enc, enc_mask, incremental_state)
        return self.run_block_on_subbatch(layer, x, active, enc, enc_mask, incremental_state, pad_mask), None

    @staticmethod
    def cache_source_kv(attn, enc, enc_mask, incremental_state):
        """The paper's FirstCall (App. B) for a block that only a few rows reach: its source keys/values,
        computed and cached exactly as fairseq's encoder-decoder attention does on its first call (one
        per sentence when the generator set a beam size), without running the block on every row."""
        key, mask = enc, enc_mask
        if attn.beam_size > 1 and key.size(1) % attn.beam_size == 0:  # S x B*beam x C → S x B x C
            key = key.view(key.size(0), -1, attn.beam_size, key.size(2))[:, :, 0, :]
            if mask is not None:
                mask = mask.view(-1, attn.beam_size, mask.size(1))[:, 0, :]
        src_len, kv_bsz = key.shape[:2]

        def heads(t):  # S x B x C → B x H x S x d, fairseq's cache layout
            return t.contiguous().view(src_len, kv_bsz * attn.num_heads, attn.head_dim).transpose(0, 1) \
                .reshape(kv_bsz, attn.num_heads, src_len, attn.head_dim)

        mask = MultiheadAttention._append_prev_key_padding_mask(
            key_padding_mask=mask, prev_key_padding_mask=None, batch_size=kv_bsz, src_len=src_len, static_kv=True)
        attn._set_input_buffer(incremental_state, {"prev_key": heads(attn.k_proj(key)),
                                                   "prev_value": heads(attn.v_proj(key)),
                                                   "prev_key_padding_mask": mask})

    def run_block_on_subbatch(self, layer, x, active, enc, enc_mask, incremental_state, pad_mask):
        """Gather the active rows and their caches, run the layer, scatter its new keys/values back
        next to the exited rows' copied keys/values."""
        bsz = x.size(1)
        self_buf = layer.self_attn._get_input_buffer(incremental_state)
        sub_state: Dict[str, Dict[str, Optional[Tensor]]] = {}
        layer.self_attn._set_input_buffer(sub_state, _select_rows(self_buf, active))
        if layer.encoder_attn is not None:
            cross_buf = layer.encoder_attn._get_input_buffer(incremental_state)
            per_row = bsz // cross_buf["prev_key"].size(0)  # fairseq keeps one source K/V per sentence
            layer.encoder_attn._set_input_buffer(sub_state, _select_rows(cross_buf, active // per_row))
        sub_pad = pad_mask.index_select(0, active) if pad_mask is not None else None
        out, _, _ = layer(x.index_select(1, active), enc, enc_mask, sub_state, self_attn_padding_mask=sub_pad)
        # every row's new keys/values come from its block input (the copy, for exited rows), which is
        # also what the layer projected for the active ones: one batched projection serves all rows
        new_k, new_v = self.copied_kv(layer, x.transpose(0, 1))  # B x H x 1 x d, 4 d² per row
        self.append_kv(layer, incremental_state, self_buf, new_k, new_v)
        x = x.clone()
        x[:, active] = out
        return x

    def copied_kv(self, layer, h):
        """Keys/values of block ``layer`` for the states h (B x P x C) — what the block's
        self-attention would have cached for them (B x H x P x d); mirrors MultiheadAttention."""
        attn = layer.self_attn
        if layer.normalize_before:
            h = layer.self_attn_layer_norm(h)
        bsz, steps = h.shape[:2]
        k = attn.k_proj(h).reshape(bsz, steps, attn.num_heads, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(h).reshape(bsz, steps, attn.num_heads, attn.head_dim).transpose(1, 2)
        return k, v

    def append_copied_kv(self, layer, x, incremental_state):
        k, v = self.copied_kv(layer, x.transpose(0, 1))
        self.append_kv(layer, incremental_state, layer.self_attn._get_input_buffer(incremental_state), k, v)

    def catch_up_block(self, index: int, layer, incremental_state):
        """Before block ``index`` runs in deferred mode: the beam reorderings it missed (composed into
        one), then the keys/values of the positions every row skipped it at."""
        pending = self.get_incremental_state(incremental_state, "pending_order")
        if pending is not None and pending.get(str(index)) is not None:
            layer.self_attn.reorder_incremental_state(incremental_state, pending[str(index)])
            pending[str(index)] = None
            self.set_incremental_state(incremental_state, "pending_order", pending)
        self.materialize_pending_kv(layer, incremental_state)

    def reorder_incremental_state_scripting(self, incremental_state, new_order):
        """fairseq's beam reordering, except with deferred keys/values: each block's self-attention
        cache is reordered when the block next runs (the composed order, one index_select), so the
        caches of blocks no row reaches cost nothing per step."""
        policy = getattr(self, "exit_policy", None)
        if policy is None or policy.kv_mode != "deferred":
            return super().reorder_incremental_state_scripting(incremental_state, new_order)
        pending = dict(self.get_incremental_state(incremental_state, "pending_order") or {})
        for i, layer in enumerate(self.layers):
            key = str(i)
            if pending.get(key) is not None:
                pending[key] = pending[key].index_select(0, new_order)
            elif "prev_key" in layer.self_attn._get_input_buffer(incremental_state):
                pending[key] = new_order
            if layer.encoder_attn is not None:
                layer.encoder_attn.reorder_incremental_state(incremental_state, new_order)
        self.set_incremental_state(incremental_state, "pending_order", pending)
        self.reorder_incremental_state(incremental_state, new_order)

    def materialize_pending_kv(self, layer, incremental_state):
        """Deferred copy rule: the positions this block was skipped at by every row get their keys/
        values now, in one projection of the recorded exit states (their block input, §2)."""
        states = self.state_history(incremental_state)
        if states is None:
            return
        buf = layer.self_attn._get_input_buffer(incremental_state)
        done = buf["prev_key"].size(2) if "prev_key" in buf else 0
        if done < states.size(1):
            k, v = self.copied_kv(layer, states[:, done:])
            self.append_kv(layer, incremental_state, buf, k, v)

    @staticmethod
    def append_kv(layer, incremental_state, buf, k, v):
        if "prev_key" in buf:
            k = torch.cat([buf["prev_key"], k], dim=2)
            v = torch.cat([buf["prev_value"], v], dim=2)
        else:  # fairseq views the cache as (B*H) x T x d
            k, v = k.contiguous(), v.contiguous()
        pad = buf.get("prev_key_padding_mask")
        if pad is not None:  # the new positions are never padding
            pad = torch.cat([pad, pad.new_zeros(pad.size(0), k.size(2))], dim=1)
        new_buf = {"prev_key": k, "prev_value": v, "prev_key_padding_mask": pad}
        layer.self_attn._set_input_buffer(incremental_state, new_buf)

    def step_logits(self, h: Tensor, step_exits: Tensor, ready_logits) -> Tensor:
        """B x C final states → B x V logits: each row projected once, by its exit's classifier;
        rows whose logits the policy already computed (confidence thresholding) reuse them."""
        if not ready_logits:
            return self.logits_at_exits(h, step_exits)
        vocab = next(iter(ready_logits.values()))[1].size(-1)
        out = h.new_empty(h.size(0), vocab)
        done = torch.zeros_like(step_exits, dtype=torch.bool)
        for rows, logits in ready_logits.values():
            out[rows] = logits.to(out.dtype)
            done[rows] = True
        rest = (~done).nonzero().squeeze(1)
        if rest.numel():
            out[rest] = self.logits_at_exits(h.index_select(0, rest), step_exits[rest]).to(out.dtype)
        return out

    def record_step_exits(self, incremental_state, step_exits, final_states: Optional[Tensor] = None):
        """Appends this step's exits to the exit history (B x steps) kept in the incremental state,
        and with deferred keys/values its final states (B x steps x C: each row's exit state, the
        input of every block it skipped), so beam reordering carries both with the hypotheses."""
        buf = dict(self.get_incremental_state(incremental_state, "exits") or {})
        for key, new in (("history", step_exits.unsqueeze(1)),
                         ("states", final_states.unsqueeze(1) if final_states is not None else None)):
            if new is not None:
                buf[key] = new if buf.get(key) is None else torch.cat([buf[key], new], dim=1)
        self.set_incremental_state(incremental_state, "exits", buf)

    def exit_history(self, incremental_state) -> Optional[Tensor]:
        buf = self.get_incremental_state(incremental_state, "exits")
        return None if buf is None else buf.get("history")

    def state_history(self, incremental_state) -> Optional[Tensor]:
        buf = self.get_incremental_state(incremental_state, "exits")
        return None if buf is None else buf.get("states")

    def materialize_all_pending_kv(self, incremental_state):
        """Every block's cache complete and in beam order (tests compare it with a full pass)."""
        for i, layer in enumerate(self.layers):
            self.catch_up_block(i, layer, incremental_state)

    def reorder_incremental_state(self, incremental_state, new_order):
        """Exit history and per-row planned depths follow the beam, like the K/V caches."""
        buf = self.get_incremental_state(incremental_state, "exits")
        if buf is not None:
            buf = {k: (v.index_select(0, new_order) if v is not None else None) for k, v in buf.items()}
            self.set_incremental_state(incremental_state, "exits", buf)


def _encoder_tensors(encoder_out):
    enc = enc_mask = None
    if encoder_out is not None and len(encoder_out["encoder_out"]) > 0:
        enc = encoder_out["encoder_out"][0]
    if encoder_out is not None and len(encoder_out["encoder_padding_mask"]) > 0:
        enc_mask = encoder_out["encoder_padding_mask"][0]
    return enc, enc_mask


def _select_rows(buf: Dict[str, Optional[Tensor]], rows: Tensor) -> Dict[str, Optional[Tensor]]:
    return {k: (v.index_select(0, rows) if v is not None else None) for k, v in buf.items()}


# ---- architectures ------------------------------------------------------------------------------


@register_model_architecture("adaptive_transformer", "adaptive_transformer")
def adaptive_base_architecture(args):
    """fairseq's base transformer plus the adaptive defaults: separate exit classifiers (the paper's
    IWSLT choice), no depth estimator (stage 1)."""
    args.exit_classifiers = getattr(args, "exit_classifiers", None) or "separate"
    args.depth_estimator = getattr(args, "depth_estimator", None) or "none"
    args.separate_halting = getattr(args, "separate_halting", False)
    args.detach_estimator = getattr(args, "detach_estimator", False)
    args.init_from_transformer = getattr(args, "init_from_transformer", None)
    args.freeze_trunk = getattr(args, "freeze_trunk", False)
    base_architecture(args)


@register_model_architecture("adaptive_transformer", "adaptive_transformer_iwslt_de_en")
def adaptive_transformer_iwslt_de_en(args):
    """The paper's IWSLT14 model (§4.1): 6+6 blocks, encoder width 512, decoder width 256, FFN 1024,
    4 heads, dropout 0.3, untied embeddings, 6 separate exit classifiers."""
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 512)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 1024)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 4)
    args.encoder_layers = getattr(args, "encoder_layers", 6)
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", 256)
    args.decoder_ffn_embed_dim = getattr(args, "decoder_ffn_embed_dim", 1024)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 4)
    args.decoder_layers = getattr(args, "decoder_layers", 6)
    args.dropout = getattr(args, "dropout", 0.3)
    args.exit_classifiers = getattr(args, "exit_classifiers", None) or "separate"
    adaptive_base_architecture(args)


@register_model_architecture("adaptive_transformer", "adaptive_transformer_wmt_en_fr_big")
def adaptive_transformer_wmt_en_fr_big(args):
    """The paper's WMT14 En-Fr model: Transformer big, encoder/decoder embeddings and all exit
    classifiers tied (one shared matrix)."""
    args.share_all_embeddings = getattr(args, "share_all_embeddings", True)
    args.exit_classifiers = getattr(args, "exit_classifiers", None) or "shared"
    args.dropout = getattr(args, "dropout", 0.1)
    transformer_wmt_en_de_big(args)
    adaptive_base_architecture(args)


@register_model_architecture("adaptive_transformer", "adaptive_transformer_tiny")
def adaptive_transformer_tiny(args):
    """A few-thousand-parameter model for tests and smoke runs."""
    for name, value in (("encoder_embed_dim", 32), ("encoder_ffn_embed_dim", 64), ("encoder_layers", 2),
                        ("encoder_attention_heads", 2), ("decoder_embed_dim", 32),
                        ("decoder_ffn_embed_dim", 64), ("decoder_layers", 3), ("decoder_attention_heads", 2)):
        setattr(args, name, getattr(args, name, value))
    adaptive_base_architecture(args)
