"""Depth-adaptive decoding served by CTranslate2 (Elbayad et al., ICLR 2020: exits §2.1, Seq-multinomial §3.1).

CTranslate2 runs stock transformers only: it cannot skip blocks, and its fairseq converter rejects
plugin architectures and extra parameters. Sequence-level depth needs neither. With one depth per
sentence (§3.1), exit k of the anytime decoder *is* a plain transformer: the encoder, decoder blocks
1..k and exit k's classifier C_k (with its layer norm in pre-norm models) as output layer (§2.1). So
every exit is exported as its own engine model, and each sentence is translated by the model of the
depth its estimator predicts.

Export (:func:`export`, ``python -m fairseq_dat.cli.export_ctranslate2 CKPT OUT_DIR``) writes::

    OUT_DIR/exit{k}/       one CTranslate2 model per exported exit k, made by CTranslate2's own
                           ``FairseqConverter`` from a stock ``transformer`` checkpoint (blocks 1..k, head k)
    OUT_DIR/encoder/       sequence-level estimators only: the encoder alone as a CTranslate2 encoder
                           model (float32), whose output the estimator reads to route
    OUT_DIR/estimator.pt   the depth estimator: name, level, sizes and state tensors
                           (``torch.load(path, weights_only=True)`` reads it)
    OUT_DIR/dict.SRC.txt, dict.TGT.txt, the BPE codes if given
    OUT_DIR/manifest.json  num_exits, exits, quantization, estimator, languages, file names

Serving (:class:`AdaptiveTranslator`, ``python -m fairseq_dat.cli.ct2_translate OUT_DIR``): the
encoder model encodes each sentence once for routing; the estimator maps the mean encoder state to
q(n | x) and picks the depth by the generator's rule (:func:`decide_by_cumulative`: the first n with
q(1)+…+q(n) ≥ τ, argmax q without τ), exactly as ``fairseq-generate --exit-threshold τ`` does; the
sentences are grouped by depth and each group is translated in batches by that depth's model. The
engine's own translate call encodes the source again: CTranslate2 4.8 has no call that decodes from
given encoder states (``Translator`` has no ``encode``), so routing costs one extra encoder pass.

This module's name shadows nothing: ``import ctranslate2`` below is absolute (the PyPI engine).
"""
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import ctranslate2
import numpy as np
import torch
from ctranslate2.converters import FairseqConverter
from ctranslate2.specs import transformer_spec
from ctranslate2.specs.model_spec import ACCEPTED_MODEL_TYPES

from .errors import ConfigError
from .modules.depth_estimators import build_depth_estimator, decide_by_cumulative, single_threshold
from .stock_exits import stock_args, truncated_stock_model

MANIFEST = "manifest.json"
ESTIMATOR_FILE = "estimator.pt"
ENCODER_DIR = "encoder"
FORMAT_VERSION = 1
EOS = "</s>"  # fairseq's EOS; the engine appends it to sources itself (config add_source_eos)


def exit_dir(out_dir: str, k: int) -> str:
    return os.path.join(out_dir, f"exit{k}")


# ---- export ----------------------------------------------------------------------------------------


def parse_exits(text: str, num_exits: int) -> List[int]:
    """``--exits``: "all" or comma-separated 1-based block numbers in 1..N → sorted distinct list."""
    if text.strip().lower() == "all":
        return list(range(1, num_exits + 1))
    try:
        exits = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ConfigError(f"--exits must be 'all' or comma-separated block numbers in 1..{num_exits}, "
                          f"got {text!r}") from None
    if not exits or not all(1 <= k <= num_exits for k in exits):
        raise ConfigError(f"--exits must be block numbers in 1..{num_exits} for this checkpoint, got {text!r}")
    return exits


def check_quantization(quantization: str) -> str:
    if quantization not in ACCEPTED_MODEL_TYPES:
        raise ConfigError(f"--quantization must be one of {', '.join(ACCEPTED_MODEL_TYPES)}, got {quantization!r}")
    return quantization


def check_exportable(model, path: str):
    """Features the engine's converter cannot take, named before any conversion runs (the converter's
    own checks, e.g. pre-norm encoder with post-norm decoder, are turned into ConfigErrors by
    :func:`convert_exit`)."""
    decoder = model.decoder
    if not hasattr(decoder, "exit_logits"):
        raise ConfigError(f"{path} is not an adaptive_transformer checkpoint (its decoder is a "
                          f"{type(decoder).__name__}): convert it with ct2-fairseq-converter directly")
    if decoder.adaptive_softmax is not None:
        raise ConfigError(f"{path}: --adaptive-softmax-cutoff models cannot be exported to CTranslate2")
    enc_dim, dec_dim = model.encoder.embed_tokens.embedding_dim, decoder.embed_dim
    if enc_dim != dec_dim:
        raise ConfigError(f"{path}: encoder width {enc_dim} differs from decoder width {dec_dim}; CTranslate2's "
                          "transformer needs one model width (--encoder-embed-dim = --decoder-embed-dim)")


class _EncoderOnlyConverter(FairseqConverter):
    """CTranslate2's fairseq converter, keeping only the encoder as an encoder model (the engine's
    ``ctranslate2.Encoder``), for routing."""

    def _load(self):
        spec = super()._load()
        encoder_spec = transformer_spec.TransformerEncoderModelSpec(spec.encoder)
        encoder_spec.register_vocabulary(spec._vocabularies["source"][0])  # as registered by the converter
        encoder_spec.config.eos_token = EOS
        return encoder_spec


def convert_exit(stock_checkpoint: str, vocab_dir: str, langs, out: str, quantization: str, source: str,
                 converter_cls=FairseqConverter):
    """Run CTranslate2's fairseq converter on a stock checkpoint; its rejections become ConfigErrors."""
    converter = converter_cls(stock_checkpoint, vocab_dir, source_lang=langs[0], target_lang=langs[1],
                              unsafe_deserialization=True)  # our own temporary file
    try:
        converter.convert(out, quantization=quantization, force=True)
    except (ValueError, NotImplementedError) as err:
        message = " ".join(str(err).split())
        raise ConfigError(f"{source}: CTranslate2's fairseq converter rejects this model: {message}") from None


def effective_state_dict(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """State tensors of the function ``module`` computes: each ``nn.Linear``'s affine map is read off
    its outputs (bias = f(0), weight = f(I) − f(0)), so a hook that rescales a layer's output (e.g. the
    ``--estimator-lr-multiplier`` reparametrization, stored weights / C and outputs × C) is folded in."""
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        for name, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear):
                prefix = f"{name}." if name else ""
                eye = torch.eye(layer.in_features, dtype=layer.weight.dtype)
                at_zero = layer(torch.zeros_like(eye[:1]))[0]  # out
                state[prefix + "weight"] = (layer(eye) - at_zero).t().contiguous()  # out x in
                if layer.bias is not None:
                    state[prefix + "bias"] = at_zero
    return state


def estimator_record(decoder) -> Optional[dict]:
    """The depth estimator as plain data (weights_only-loadable): name, level, sizes, state tensors
    (of the function it computes, see :func:`effective_state_dict`)."""
    estimator = decoder.depth_estimator
    if estimator is None:
        return None
    return {"name": estimator.name, "level": estimator.level, "input_dim": estimator.input_dim,
            "num_exits": estimator.num_exits, "separate_halting": bool(estimator.separate_halting),
            "state_dict": effective_state_dict(estimator)}


def export(model, model_args, task, out_dir: str, exits: Sequence[int], quantization: str = "float32",
           source: str = "the checkpoint", bpe_codes: Optional[str] = None, log=print) -> dict:
    """Write the CTranslate2 deployment of a loaded ``adaptive_transformer`` into ``out_dir`` (layout in
    the module docstring). Returns the manifest."""
    check_exportable(model, source)
    check_quantization(quantization)
    if bpe_codes is not None and not os.path.isfile(bpe_codes):
        raise ConfigError(f"--bpe-codes: file {bpe_codes} not found")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"output directory {out_dir} is an existing file")
    os.makedirs(out_dir, exist_ok=True)
    langs = (task.cfg.source_lang, task.cfg.target_lang)
    dict_files = [f"dict.{lang}.txt" for lang in langs]
    task.source_dictionary.save(os.path.join(out_dir, dict_files[0]))
    task.target_dictionary.save(os.path.join(out_dir, dict_files[1]))
    decoder = model.decoder
    record = estimator_record(decoder)
    routable = record is not None and record["level"] == "sequence"
    with tempfile.TemporaryDirectory(prefix="dat-ct2-export-") as tmp:
        for k in exits:
            checkpoint = os.path.join(tmp, f"exit{k}.pt")
            stock = truncated_stock_model(model, model_args, task, k)
            torch.save({"args": stock_args(model_args, k), "cfg": None, "model": stock.state_dict()}, checkpoint)
            convert_exit(checkpoint, out_dir, langs, exit_dir(out_dir, k), quantization, source)
            log(f"exit {k}: {exit_dir(out_dir, k)}")
        if routable:  # float32, so routing decides on the encoder output fairseq computes
            convert_exit(checkpoint, out_dir, langs, os.path.join(out_dir, ENCODER_DIR), "float32", source,
                         converter_cls=_EncoderOnlyConverter)
            log(f"encoder (routing): {os.path.join(out_dir, ENCODER_DIR)}")
    if record is not None:
        torch.save(record, os.path.join(out_dir, ESTIMATOR_FILE))
    elif os.path.exists(os.path.join(out_dir, ESTIMATOR_FILE)):
        os.remove(os.path.join(out_dir, ESTIMATOR_FILE))  # a stale one from an earlier export
    codes = None
    if bpe_codes is not None:
        codes = os.path.basename(bpe_codes)
        shutil.copyfile(bpe_codes, os.path.join(out_dir, codes))
    manifest = {
        "format": FORMAT_VERSION, "num_exits": decoder.num_layers, "exits": list(exits),
        "quantization": quantization,
        "estimator": record["name"] if record else getattr(decoder, "depth_estimator_name", "none"),
        "estimator_level": record["level"] if record else None,
        "estimator_file": ESTIMATOR_FILE if record else None,
        "router": ENCODER_DIR if routable else None,
        "source_lang": langs[0], "target_lang": langs[1],
        "source_dictionary": dict_files[0], "target_dictionary": dict_files[1], "bpe_codes": codes,
    }
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


# ---- serving ---------------------------------------------------------------------------------------


@dataclass
class Translation:
    """One sentence's result: output tokens (BPE, no EOS), CTranslate2's score, and the depth (1-based
    exit block) of the model that produced it."""

    tokens: List[str]
    score: float
    depth: int


def read_manifest(model_dir: str) -> dict:
    path = os.path.join(model_dir, MANIFEST)
    if not os.path.isfile(path):
        raise ConfigError(f"{model_dir} is not an export of fairseq_dat.cli.export_ctranslate2 ({MANIFEST} not found)")
    with open(path) as f:
        manifest = json.load(f)
    missing = [k for k in manifest["exits"] if not os.path.isdir(exit_dir(model_dir, k))]
    if missing:
        raise ConfigError(f"{model_dir}: the manifest lists exits {missing} whose model directories are missing")
    return manifest


def load_estimator(path: str):
    """The exported depth estimator (``estimator.pt``, read with weights_only=True) as the package's
    estimator module, so routing runs the generator's own code."""
    record = torch.load(path, map_location="cpu", weights_only=True)
    estimator = build_depth_estimator(record["name"], record["input_dim"], record["num_exits"],
                                      record["separate_halting"])
    estimator.load_state_dict(record["state_dict"])
    return estimator.eval()


def as_tokens(sentence: Union[str, Sequence[str]]) -> List[str]:
    """A BPE'd sentence as a string (split on whitespace, as fairseq's dictionary does) or tokens."""
    return sentence.split() if isinstance(sentence, str) else list(sentence)


class AdaptiveTranslator:
    """Translate with the exported exits, each sentence by the model of its predicted depth.

    Args:
        model_dir: an ``export_ctranslate2`` output directory.
        device: CTranslate2 device ("cpu", "cuda").
        threads: intra-op threads of each engine model (``intra_threads``).
        compute_type: CTranslate2 compute type of the exit models ("default": as exported).
        router_compute_type: of the routing encoder (default float32: the depths of fairseq's generator).
    """

    def __init__(self, model_dir: str, device: str = "cpu", threads: int = 2, compute_type: str = "default",
                 router_compute_type: str = "float32"):
        self.model_dir = model_dir
        self.manifest = read_manifest(model_dir)
        self.num_exits = self.manifest["num_exits"]
        self.exits = list(self.manifest["exits"])
        options = {"device": device, "inter_threads": 1, "intra_threads": threads}
        self.translators = {k: ctranslate2.Translator(exit_dir(model_dir, k), compute_type=compute_type, **options)
                            for k in self.exits}
        self.estimator = self.encoder = None
        if self.manifest.get("router"):
            self.estimator = load_estimator(os.path.join(model_dir, self.manifest["estimator_file"]))
            self.encoder = ctranslate2.Encoder(os.path.join(model_dir, self.manifest["router"]),
                                               compute_type=router_compute_type, **options)

    # ---- depth ----------------------------------------------------------------------------------

    def check_routable(self):
        if self.estimator is None:
            name, level = self.manifest["estimator"], self.manifest.get("estimator_level")
            why = (f"its depth estimator '{name}' decides per token" if level == "token"
                   else f"it has no trained depth estimator ('{name}')")
            raise ConfigError(f"{self.model_dir} cannot route sentences by depth: {why}, and each CTranslate2 "
                              "model runs one depth for a whole sentence; use --fixed-exit k, or export a "
                              "checkpoint trained with --depth-estimator sequence (or sequence-poisson-binomial)")

    def encode(self, batch: List[List[str]]):
        """Encoder states (S, B, C) float32 and padding mask (B, S) of a batch, EOS appended as fairseq does."""
        sources = [tokens + [EOS] for tokens in batch]
        states = torch.from_numpy(np.array(self.encoder.forward_batch(sources).last_hidden_state))  # B x S x C
        lengths = torch.tensor([len(s) for s in sources])
        mask = torch.arange(states.size(1)).unsqueeze(0) >= lengths.unsqueeze(1)  # B x S, True on padding
        return states.transpose(0, 1), mask

    def predict_depths(self, sentences: Sequence, exit_threshold=None, batch_size: int = 64) -> List[int]:
        """1-based depth per sentence: the first n with q(1)+…+q(n) ≥ τ (argmax q without τ), §3.1."""
        self.check_routable()
        try:
            threshold = single_threshold(exit_threshold, self.estimator.name)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        tokens = [as_tokens(s) for s in sentences]
        depths = [0] * len(tokens)
        with torch.no_grad():
            for ids in length_sorted_batches(range(len(tokens)), tokens, batch_size):  # little padding per batch
                states, mask = self.encode([tokens[i] for i in ids])
                log_q = self.estimator.log_q(states, mask)  # B x N
                for i, depth in zip(ids, (decide_by_cumulative(log_q, threshold) + 1).tolist()):
                    depths[i] = depth
        return depths

    def served_exit(self, depth: int) -> int:
        """The exported exit that serves a predicted depth: the shallowest exported one ≥ depth (the
        deepest exported one if none is)."""
        deeper = [k for k in self.exits if k >= depth]
        return min(deeper) if deeper else max(self.exits)

    # ---- translation ----------------------------------------------------------------------------

    def translate(self, sentences: Sequence, beam: int = 5, exit_threshold=None, fixed_exit: Optional[int] = None,
                  batch_size: int = 64, max_len_a: float = 0.0, max_len_b: int = 200, **options) -> List[Translation]:
        """Translate BPE'd sentences (strings or token lists); results in input order.

        ``fixed_exit`` k: every sentence by exit k's model. Otherwise each sentence's depth comes from
        the sequence estimator (``exit_threshold`` τ, or argmax q without it) and sentences of one depth
        are translated together, ``batch_size`` at a time, shortest sources first (as CTranslate2 batches
        them itself). Each batch may generate ``max_len_a`` · S + ``max_len_b`` tokens, S its longest source
        with EOS: fairseq-generate's ``--max-len-a/--max-len-b`` rule. ``options`` go to ``translate_batch``.
        """
        if fixed_exit is not None and exit_threshold is not None:
            raise ConfigError("--fixed-exit and --exit-threshold exclude each other")
        tokens = [as_tokens(s) for s in sentences]
        if fixed_exit is not None:
            if fixed_exit not in self.translators:
                raise ConfigError(f"--fixed-exit {fixed_exit}: exported exits are {self.exits} (of 1..{self.num_exits})")
            depths = [fixed_exit] * len(tokens)
        else:
            depths = [self.served_exit(d) for d in self.predict_depths(tokens, exit_threshold, batch_size)]
        results: List[Optional[Translation]] = [None] * len(tokens)
        for k, ids in group_by(depths).items():
            for batch in length_sorted_batches(ids, tokens, batch_size):
                limit = fairseq_max_len(max_len_a, max_len_b, max(len(tokens[i]) for i in batch) + 1)
                outputs = self.translators[k].translate_batch(
                    [tokens[i] for i in batch], beam_size=beam, max_batch_size=0, max_decoding_length=limit,
                    return_scores=True, **options)
                for i, out in zip(batch, outputs):
                    results[i] = Translation(out.hypotheses[0], out.scores[0], k)
        return results


def fairseq_max_len(max_len_a: float, max_len_b: int, src_len: int) -> int:
    """The most tokens a batch may generate under fairseq-generate's ``--max-len-a/--max-len-b``:
    ``int(a · src_len + b)``, src_len the batch's longest source with its EOS (SequenceGenerator's rule).
    Per batch, not per call: one sentence whose last beams never end cannot hold every batch for
    ``max_len_b`` steps."""
    return int(max_len_a * src_len + max_len_b)


def length_sorted_batches(ids: Sequence[int], tokens: Sequence[List[str]], batch_size: int) -> List[List[int]]:
    """``ids`` in batches of ``batch_size``, shortest sources first (stable): what ``translate_batch``'s
    ``max_batch_size`` does inside the engine, done here so that each batch gets its own length limit."""
    order = sorted(ids, key=lambda i: len(tokens[i]))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def group_by(depths: Sequence[int]) -> Dict[int, List[int]]:
    """Sentence indices per depth, shallowest depth first, input order within a depth."""
    groups: Dict[int, List[int]] = {}
    for i, depth in enumerate(depths):
        groups.setdefault(depth, []).append(i)
    return dict(sorted(groups.items()))


def average_exit(results: Sequence[Translation]) -> float:
    """AE over output tokens, EOS included (each token of a sentence exits at the sentence's depth)."""
    tokens = sum(len(r.tokens) + 1 for r in results)
    return sum(r.depth * (len(r.tokens) + 1) for r in results) / tokens if tokens else float("nan")
