#!/usr/bin/env python
"""Wall-clock speed of depth-adaptive decoding against its limit, in one process.

For each decoding setting (batch size x beam size) the same batches (fairseq's
``task.get_batch_iterator``) are decoded by:

1. ``fairseq``        fairseq's own ``SequenceGenerator`` on a stock ``transformer`` holding the
                      checkpoint's trunk and last exit (full depth): the reference row;
2. ``ours``           ``AdaptiveSequenceGenerator`` without exit flags, and ``ours fixed=N`` (full
                      depth through the exit-aware block loop): the generator's overhead;
3. ``limit k``        fairseq's ``SequenceGenerator`` on the same weights truncated to k blocks with
                      exit k as output layer: the fastest that decoding at average exit k can be;
4. ``estimator T``    ours with the checkpoint's depth estimator at each threshold T, and
   ``confidence T``   ours with confidence thresholding at each T;
5. ``ct2 float32/int8`` CTranslate2 on the full-depth model (skipped with a reason if unavailable);
6. ``ct2 TYPE exit k``  CTranslate2 on exit k exported as its own model (``fairseq_dat.ctranslate2``), and
   ``ct2 TYPE adaptive T`` each sentence at the depth its sequence-level estimator predicts at threshold T,
                      routed per batch, and ``… stream``: the setting's sentences routed in one call,
                      printed also against row 5 of the same type (``CT2 RESULT``: the fastest within
                      --bleu-tolerance of it).
7. ``bf16 …``       with ``--autocast-bf16``: ours at full depth, each fixed exit and each estimator
                      threshold decoded under torch.autocast(bfloat16) (CTranslate2 4.8 has no bfloat16
                      compute type on a CPU).

``--rows ct2`` keeps row 1, row 5 and the CTranslate2 rows only, with every exit k = 1..N streamed
(``ct2 TYPE exit k stream``) and the stream rows compared with the streamed full depth (k = N): the
same one-call re-batching on both sides, and more passes in the same time.

Each row reports tokens/s and sentences/s (median of interleaved repeats; only the generator calls
are timed), BLEU (fairseq's tokenized BLEU scorer on --remove-bpe'd output, one scorer for all rows),
output length (tokens per sentence, EOS included), AE (mean exit over output tokens), compute AE
(over every beam row decoded: what time follows), Appendix-B decoder FLOPs per token
(:mod:`fairseq_dat.flops`), speedup (tokens/s against row 1) and, for our rows, efficiency =
speedup / ideal, where ideal is the limit's speedup at the same AE (the limit's time per token
interpolated linearly between integer k); "eff. at compute AE" uses the compute AE instead.
Time per token also depends on output length (rows whose outputs are longer or shorter are not
quite comparable); ``--fixed-length L`` forces every row to L tokens for a like-for-like timing.

The last line printed is machine-readable (first setting, by default beam 5 x batch 64):
``RESULT speedup=… ideal=… efficiency=… bleu_delta=… ae=… overhead=… ct2_f32=… ct2_int8=… eff_min=…``
(+ ``bf16_full=… bf16_best=… bf16_bleu_delta=… bf16_ae=…`` with ``--autocast-bf16``).
A markdown table and a PNG (BLEU against tokens/s) go to ``--out-dir``.
"""
import argparse
from abc import ABC, abstractmethod
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import fairseq_dat  # noqa: F401  (first: registers the plugin, allows fairseq checkpoints to load)
import torch
import torch.nn as nn
from fairseq import checkpoint_utils
from fairseq.sequence_generator import SequenceGenerator

from fairseq_dat.cli import quiet_root_logger, run_main
from fairseq_dat.cli.generate_like import GenerateBleu, generate_batches
from fairseq_dat.cli.threshold_search import parse_sweep_values
from fairseq_dat.flops import DecoderDims, exit_rule, flops_per_token
from fairseq_dat.sequence_generator import AdaptiveSequenceGenerator
from fairseq_dat.stock_exits import stock_args, truncated_stock_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT_DIR = os.path.join(os.path.dirname(REPO), "runs", "benchmarks")
REMOVE_BPE = "subword_nmt"  # fairseq-generate --remove-bpe (the default "@@ ")
FIXED_TOO = ("fixed", "estimator", "confidence")
BF16_KINDS = ("bf16-ours", "bf16-fixed", "bf16-estimator")  # --autocast-bf16 rows


# ---- command line ---------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="fairseq data-bin directory (e.g. data-bin/multi30k_de_en)")
    parser.add_argument("--path", required=True, help="adaptive_transformer checkpoint")
    parser.add_argument("--subset", default="test", help="data split to decode (default: test)")
    parser.add_argument("--quick", action="store_true",
                        help="a run that fits in about 10 minutes on 2 cores: the first 500 sentences, "
                             "settings 64x5, 64x1 and 1x5 (the last on the first 100 sentences), the full "
                             "threshold sweeps only in the first setting")
    parser.add_argument("--threads", type=int, default=2, help="torch and CTranslate2 threads (default: 2)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed passes per row, interleaved across rows; the median is reported")
    parser.add_argument("--max-sentences", type=int, default=None,
                        help="decode only the first N sentences of the split (default: all; --quick: 500)")
    parser.add_argument("--batch1-sentences", type=int, default=None,
                        help="first N sentences for batch-size-1 settings (default: as --max-sentences; "
                             "--quick: 100)")
    parser.add_argument("--settings", default=None,
                        help="comma-separated BATCHxBEAM settings, the first is the headline one "
                             "(default: 64x5,64x1,1x5,1x1; --quick: 64x5,64x1,1x5)")
    parser.add_argument("--estimator-thresholds", default="0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
                        help="--exit-threshold values for the checkpoint's depth estimator")
    parser.add_argument("--confidence-thresholds", default="0.5,0.7,0.8,0.9,0.95",
                        help="--exit-threshold values for --exit-strategy confidence")
    parser.add_argument("--full-sweep-everywhere", action="store_true",
                        help="run the threshold sweeps in every setting (default without --quick); "
                             "otherwise later settings only rerun the first setting's best thresholds")
    parser.add_argument("--bleu-tolerance", type=float, default=0.3,
                        help="an adaptive row counts for RESULT if its BLEU is within this of row 1")
    parser.add_argument("--max-len-a", type=float, default=0.0,
                        help="fairseq-generate --max-len-a: each batch generates at most a * S + b tokens, S its "
                             "longest source (every engine; the demo recipe evaluates with 1.2 and 10)")
    parser.add_argument("--max-len-b", type=int, default=200, help="fairseq-generate --max-len-b")
    parser.add_argument("--fixed-length", type=int, default=None, metavar="L",
                        help="force every output to L tokens + EOS (fairseq --min-len = max length), so every "
                             "row decodes the same number of tokens: a clean time-per-token comparison (BLEU "
                             "is then meaningless)")
    parser.add_argument("--no-ct2", action="store_true", help="skip the CTranslate2 rows")
    parser.add_argument("--autocast-bf16", action="store_true",
                        help="also decode our rows under --autocast-bf16 (bfloat16 matrix products on the float32 "
                             "weights): 'bf16 full', 'bf16 fixed=k' for each exit, 'bf16 estimator T' for each "
                             "threshold; RESULT gains bf16_full, bf16_best (fastest within --bleu-tolerance of row 1), "
                             "bf16_bleu_delta and bf16_ae")
    parser.add_argument("--rows", choices=("all", "ct2"), default="all",
                        help="ct2: only fairseq's full-depth row and the CTranslate2 rows, every exit also "
                             "streamed (``ct2 TYPE exit k stream``, k = N is the streamed full depth the "
                             "stream rows are compared with): more passes in the same time for the deployment "
                             "comparison (default: all)")
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR,
                        help=f"where the markdown table and the PNG go (default: {DEFAULT_OUT_DIR})")
    args = parser.parse_args(argv)
    if args.rows == "ct2" and args.no_ct2:
        parser.error("--rows ct2 needs the CTranslate2 rows: drop --no-ct2")
    if args.max_len_a < 0 or args.max_len_b < 1:
        parser.error(f"--max-len-a must be >= 0 and --max-len-b >= 1, got {args.max_len_a:g} and {args.max_len_b}")
    if args.quick:
        args.max_sentences = args.max_sentences or 500
        args.batch1_sentences = args.batch1_sentences or 100
        args.settings = args.settings or "64x5,64x1,1x5"
    else:
        args.settings = args.settings or "64x5,64x1,1x5,1x1"
        args.full_sweep_everywhere = True
    args.settings = [parse_setting(s) for s in args.settings.split(",")]
    return args


def parse_setting(text: str) -> Tuple[int, int]:
    try:
        batch, beam = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--settings: expected BATCHxBEAM like 64x5, got {text!r}") from None
    return batch, beam


def machine_description(threads: int) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}; {os.cpu_count()} logical CPUs, {threads} threads; torch {torch.__version__}; "
            f"python {platform.python_version()}")


# ---- data ---------------------------------------------------------------------------------------


def load_batches(task, models, subset: str, batch_size: int, max_sentences: Optional[int]) -> List[dict]:
    """fairseq-generate's batches (``--batch-size``, sorted by length, no shuffling), materialized."""
    return generate_batches(task, models, task.dataset(subset), batch_size, first_n=max_sentences)


# ---- models ---------------------------------------------------------------------------------------


# ---- rows -----------------------------------------------------------------------------------------


@dataclass
class Output:
    """One decoded sentence: its id, output tokens (EOS included) and their exits (1-based)."""

    sample_id: int
    tokens: List[int]
    exits: List[int]


@dataclass
class Row(ABC):
    """A decoder to time. ``kind``: fairseq, ours, limit, estimator, confidence or ct2."""

    name: str
    kind: str
    flops_rule: str = "none"  # the Appendix-B exit-prediction cost to count
    flops_layers: Optional[int] = None  # blocks the FLOPs model sees (k for the truncated limit)
    exit_block: Optional[int] = None  # 1-based: the blocks a limit row has, the exit of a fixed row
    threshold: Optional[float] = None  # --exit-threshold of an estimator or confidence row
    times: List[float] = field(default_factory=list)
    outputs: List[Output] = field(default_factory=list)
    compute_ae: float = float("nan")

    def start(self):
        """Fresh decoder state before a timed pass (generators, exit statistics)."""

    @abstractmethod
    def generate(self, batch):
        """Decode one batch; returns what ``unpack`` reads."""

    @abstractmethod
    def unpack(self, batch, result) -> List[Output]:
        """One Output per sentence of the batch."""

    def finish(self):
        """Read what the pass counted (compute AE)."""


class FairseqRow(Row):
    """fairseq's ``SequenceGenerator`` on a stock transformer of ``blocks`` decoder blocks."""

    def __init__(self, name, kind, model, tgt_dict, search: "Search", blocks):
        super().__init__(name, kind, flops_layers=blocks, exit_block=blocks)
        self.model, self.tgt_dict, self.search, self.blocks = model, tgt_dict, search, blocks
        self.compute_ae = float(blocks)

    def start(self):
        self.generator = SequenceGenerator([self.model], self.tgt_dict, **self.search.fairseq_kwargs())

    def generate(self, batch):
        return self.generator.generate([self.model], batch)

    def unpack(self, batch, hypos):
        return [Output(int(sid), hypos[i][0]["tokens"].tolist(), [self.blocks] * len(hypos[i][0]["tokens"]))
                for i, sid in enumerate(batch["id"].tolist())]


class AdaptiveRow(FairseqRow):
    """``AdaptiveSequenceGenerator`` with the given exit flags on the adaptive model."""

    def __init__(self, name, kind, model, tgt_dict, search: "Search", flops_rule="none", **exit_kwargs):
        super().__init__(name, kind, model, tgt_dict, search, model.decoder.num_layers)
        self.flops_rule = flops_rule
        self.exit_kwargs = exit_kwargs
        self.exit_block = exit_kwargs.get("fixed_exit")
        threshold = exit_kwargs.get("exit_threshold")
        self.threshold = float(threshold) if threshold is not None else None

    def start(self):
        self.generator = AdaptiveSequenceGenerator([self.model], self.tgt_dict, **self.search.fairseq_kwargs(),
                                                   **self.exit_kwargs)

    def unpack(self, batch, hypos):
        return [Output(int(sid), hypos[i][0]["tokens"].tolist(), hypos[i][0]["exits"].tolist())
                for i, sid in enumerate(batch["id"].tolist())]

    def finish(self):
        self.compute_ae = self.generator.stats.compute_average_exit


class CT2Row(Row):
    """CTranslate2's ``Translator.translate_batch`` on the converted full-depth model."""

    def __init__(self, name, translator, sources, tgt_dict, search: "Search", blocks):
        super().__init__(name, "ct2", flops_layers=blocks)
        self.translator, self.sources, self.tgt_dict = translator, sources, tgt_dict
        self.search, self.blocks = search, blocks
        self.compute_ae = float(blocks)

    def generate(self, batch):
        tokens = [self.sources[sid] for sid in batch["id"].tolist()]
        return self.translator.translate_batch(tokens, max_batch_size=0, return_scores=False,
                                               **self.search.ct2_kwargs(batch["net_input"]["src_tokens"].size(1)))

    def unpack(self, batch, results):
        outputs = []
        for sid, result in zip(batch["id"].tolist(), results):
            tokens = [self.tgt_dict.index(tok) for tok in result.hypotheses[0]] + [self.tgt_dict.eos()]
            outputs.append(Output(int(sid), tokens, [self.blocks] * len(tokens)))
        return outputs


def convert_to_ct2(adaptive, model_args, task, data: str, workdir: str):
    """Save the full-depth model as a stock ``transformer`` checkpoint and run ``ct2-fairseq-converter``
    on it. Returns (ctranslate2 module, model directory) or (None, reason)."""
    try:
        import ctranslate2
    except ImportError as err:
        return None, f"ctranslate2 is not installed ({err}); pip install ctranslate2"
    converter = shutil.which("ct2-fairseq-converter") or os.path.join(os.path.dirname(sys.executable),
                                                                      "ct2-fairseq-converter")
    if not os.path.exists(converter):
        return None, "ct2-fairseq-converter not found next to the Python interpreter"
    stock = truncated_stock_model(adaptive, model_args, task, adaptive.decoder.num_layers)
    checkpoint = os.path.join(workdir, "stock_transformer.pt")
    torch.save({"args": stock_args(model_args), "cfg": None, "model": stock.state_dict()}, checkpoint)
    out_dir = os.path.join(workdir, "ct2")
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    proc = subprocess.run([converter, "--model_path", checkpoint, "--data_dir", data, "--output_dir", out_dir,
                           "--unsafe_deserialization"], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"ct2-fairseq-converter failed: {tail[0]}"
    return ctranslate2, out_dir


def ct2_sources(dataset, src_dict) -> Dict[int, List[str]]:
    """Source BPE tokens per sentence id, without the EOS that CTranslate2 appends itself."""
    sources = {}
    for sid in range(len(dataset)):
        ids = dataset.src[sid].tolist()
        sources[sid] = [src_dict[i] for i in ids if i != src_dict.eos()]
    return sources


class CT2AdaptiveRow(Row):
    """``fairseq_dat.ctranslate2.AdaptiveTranslator`` on the per-exit export: exit k's model for every
    sentence (``ct2 TYPE exit k``, ``route={"fixed_exit": k}``), or each sentence at the depth its
    sequence estimator predicts (``ct2 TYPE adaptive T=τ``, ``route={"exit_threshold": τ}``): the
    sentences of each benchmark batch are routed (one encoder pass more each) and grouped by depth."""

    def __init__(self, name, kind, translator, sources, tgt_dict, search: "Search", blocks, route: dict):
        super().__init__(name, kind, flops_layers=blocks, exit_block=route.get("fixed_exit"),
                         threshold=route.get("exit_threshold"))
        self.translator, self.sources, self.tgt_dict, self.search, self.route = translator, sources, tgt_dict, search, route
        if "fixed_exit" in route:
            self.compute_ae = float(route["fixed_exit"])

    def generate(self, batch):
        tokens = [self.sources[sid] for sid in batch["id"].tolist()]
        return self.translator.translate(tokens, batch_size=len(tokens), **self.search.translator_kwargs(),
                                         **self.route)

    def unpack(self, batch, results):
        outputs = []
        for sid, result in zip(batch["id"].tolist(), results):
            tokens = [self.tgt_dict.index(tok) for tok in result.tokens] + [self.tgt_dict.eos()]
            outputs.append(Output(int(sid), tokens, [result.depth] * len(tokens)))
        return outputs


class CT2StreamRow(CT2AdaptiveRow):
    """``ct2 TYPE adaptive T=τ stream``: every sentence of the setting routed and grouped by depth in one
    ``AdaptiveTranslator.translate`` call, as a deployment translating a file would (each depth's group in
    batches of the setting's batch size), timed as one call: per-batch routing (the rows above) splits
    each batch of 64 into small per-depth groups. The whole stream is decoded on the pass's first batch;
    the others read its results."""

    def start(self):
        self.results = None

    def generate(self, batch):
        if self.results is None:
            ids = sorted(self.sources)  # the sentences of this setting (run_setting passes only those)
            out = self.translator.translate([self.sources[sid] for sid in ids], batch_size=len(batch["id"]),
                                            **self.search.translator_kwargs(), **self.route)
            self.results = dict(zip(ids, out))
        return [self.results[sid] for sid in batch["id"].tolist()]


CT2_COMPUTE_TYPES = ("float32", "int8")


def export_ct2_exits(ctx, workdir: str) -> Optional[str]:
    """Every exit exported by ``fairseq_dat.ctranslate2.export`` (float32; int8 rows quantize on load),
    or None (with the reason printed) where CTranslate2 or the checkpoint cannot serve it."""
    if ctx.ct2 is None:
        return None
    from fairseq_dat.ctranslate2 import export
    from fairseq_dat.errors import ConfigError

    out_dir = os.path.join(workdir, "ct2_exits")
    try:
        export(ctx.model, ctx.model_args, ctx.task, out_dir, list(range(1, ctx.dims.num_layers + 1)),
               log=lambda *_: None)
    except ConfigError as err:
        print(f"CTranslate2 exit rows skipped: {err}")
        return None
    return out_dir


def ct2_adaptive_rows(ctx, search: "Search", args, est_thresholds, sources, fixed_exits) -> List[Row]:
    """``ct2 TYPE exit k`` for the fixed exits of this setting and ``ct2 TYPE adaptive T=τ`` for the
    estimator thresholds (sequence-level estimators only), float32 and int8."""
    if getattr(ctx, "ct2_exits", None) is None:
        return []
    from fairseq_dat.ctranslate2 import AdaptiveTranslator

    tgt_dict, n, rows = ctx.task.target_dictionary, ctx.dims.num_layers, []
    only_ct2 = args.rows == "ct2"
    for compute_type in CT2_COMPUTE_TYPES:
        translator = AdaptiveTranslator(ctx.ct2_exits, threads=args.threads, compute_type=compute_type)
        if only_ct2:  # every exit streamed, N included: the baseline of the stream rows
            rows += [CT2StreamRow(f"ct2 {compute_type} exit {k} stream", "ct2-exit" if k < n else "ct2-stream-full",
                                  translator, sources, tgt_dict, search, n, {"fixed_exit": k})
                     for k in range(1, n + 1)]
        else:
            rows += [CT2AdaptiveRow(f"ct2 {compute_type} exit {k}", "ct2-exit", translator, sources, tgt_dict, search,
                                    n, {"fixed_exit": k}) for k in fixed_exits]
        if translator.estimator is not None:
            if not only_ct2:
                rows += [CT2AdaptiveRow(f"ct2 {compute_type} adaptive T={t:g}", "ct2-adaptive", translator, sources,
                                        tgt_dict, search, n, {"exit_threshold": t}) for t in est_thresholds]
            rows += [CT2StreamRow(f"ct2 {compute_type} adaptive T={t:g} stream", "ct2-adaptive", translator, sources,
                                  tgt_dict, search, n, {"exit_threshold": t}) for t in est_thresholds]
    return rows


def ct2_relative_lines(summaries, tolerance: float) -> List[str]:
    """Each CTranslate2 exit/adaptive row against CTranslate2 at full depth of the same compute type,
    and the fastest adaptive row within ``tolerance`` BLEU of it (``CT2 RESULT``)."""
    lines = []
    for compute_type in CT2_COMPUTE_TYPES:
        # with ``--rows ct2`` the streamed full depth: the stream rows' own baseline (one call, each group
        # re-batched by CTranslate2), otherwise the per-batch full-depth row
        base = next((s for s in summaries if s.kind == "ct2-stream-full" and s.name.startswith(f"ct2 {compute_type} ")),
                    None) or next((s for s in summaries if s.name == f"ct2 {compute_type}"), None)
        ours = [s for s in summaries if s.kind in ("ct2-exit", "ct2-adaptive") and s.name.startswith(f"ct2 {compute_type} ")]
        if base is None or not ours:
            continue
        lines.append(f"ct2 {compute_type} rows against {base.name} ({base.tokens_per_s:.0f} tokens/s)")
        for s in ours:
            lines.append(f"{s.name}: {s.tokens_per_s / base.tokens_per_s:.2f}x ct2 {compute_type} full depth, "
                         f"{s.speedup:.2f}x fairseq, BLEU {s.bleu - base.bleu:+.2f} against it, AE {s.ae:.2f}")
        good = [s for s in ours if s.kind == "ct2-adaptive" and s.bleu >= base.bleu - tolerance]
        best = max(good, key=lambda s: s.tokens_per_s) if good else None
        lines.append(f"CT2 RESULT {compute_type}: " + (
            f"{best.name} speedup_vs_ct2_full={best.tokens_per_s / base.tokens_per_s:.4f} "
            f"speedup_vs_fairseq={best.speedup:.4f} bleu_delta={best.bleu - base.bleu:.4f} ae={best.ae:.4f}"
            if best else f"no adaptive row within {tolerance} BLEU of ct2 {compute_type} full depth"))
    return lines


# ---- measuring ------------------------------------------------------------------------------------


def timed_pass(row: Row, batches) -> Tuple[float, List[Output]]:
    """Decode every batch once; only the generator calls are timed."""
    row.start()
    elapsed, outputs = 0.0, []
    for batch in batches:
        begin = time.perf_counter()
        result = row.generate(batch)
        elapsed += time.perf_counter() - begin
        outputs.extend(row.unpack(batch, result))
    row.finish()
    return elapsed, outputs


def measure(rows: Sequence[Row], batches, repeats: int):
    """Warm every row up on one batch, then ``repeats`` interleaved timed passes (order reversed on
    every other pass). Decoding is deterministic: outputs are kept from the first pass."""
    for row in rows:
        timed_pass(row, batches[:1])
    for rep in range(repeats):
        for row in (rows if rep % 2 == 0 else list(reversed(rows))):
            elapsed, outputs = timed_pass(row, batches)
            row.times.append(elapsed)
            if rep == 0:
                row.outputs = outputs


class BleuReferee:
    """fairseq-generate's tokenized BLEU with --remove-bpe (``GenerateBleu``), for every row alike."""

    def __init__(self, dataset, tgt_dict):
        self.dataset, self.tgt_dict = dataset, tgt_dict

    def bleu(self, outputs: Sequence[Output]) -> float:
        scorer = GenerateBleu(self.tgt_dict, REMOVE_BPE)
        for out in outputs:
            scorer.add(self.dataset.tgt[out.sample_id], torch.tensor(out.tokens))
        return scorer.score()


@dataclass
class Summary:
    name: str
    kind: str
    tokens_per_s: float
    sentences_per_s: float
    bleu: float
    ae: float
    compute_ae: float
    mflops: float
    length: float  # output tokens per sentence, EOS included
    exit_block: Optional[int] = None  # the row's (Row.exit_block)
    threshold: Optional[float] = None  # the row's (Row.threshold)
    speedup: float = float("nan")
    ideal: float = float("nan")
    efficiency: float = float("nan")
    efficiency_cae: float = float("nan")  # against the limit at the compute AE instead


def summarize(row: Row, referee: BleuReferee, dims: DecoderDims, src_lengths: Dict[int, int]) -> Summary:
    seconds = statistics.median(row.times)
    ntokens = sum(len(o.tokens) for o in row.outputs)
    exits = [e for o in row.outputs for e in o.exits]
    layer_dims = DecoderDims(row.flops_layers or dims.num_layers, dims.embed_dim, dims.ffn_dim,
                             dims.encoder_dim, dims.vocab)
    mflops = flops_per_token(layer_dims, ((o.exits, src_lengths[o.sample_id]) for o in row.outputs),
                             row.flops_rule) / 1e6
    return Summary(row.name, row.kind, ntokens / seconds, len(row.outputs) / seconds, referee.bleu(row.outputs),
                   sum(exits) / len(exits), row.compute_ae, mflops, ntokens / len(row.outputs), row.exit_block,
                   row.threshold)


def add_speedups(summaries: List[Summary], limit_tpt: Dict[int, float]):
    """Speedup against row 1; for our rows the ideal (limit) speedup at the same AE and efficiency."""
    base = summaries[0]
    for s in summaries:
        s.speedup = s.tokens_per_s / base.tokens_per_s
        if s.kind in ("ours", "fixed", "fixed-eager", "estimator", "estimator-eager", "estimator-batch-order",
                      "confidence") + BF16_KINDS and limit_tpt:
            s.ideal = (1.0 / base.tokens_per_s) / interpolate(limit_tpt, s.ae)
            s.efficiency = s.speedup / s.ideal
            s.efficiency_cae = s.speedup * interpolate(limit_tpt, s.compute_ae) * base.tokens_per_s
        elif s.kind == "limit":
            s.ideal = s.speedup


def interpolate(points: Dict[int, float], x: float) -> float:
    """Linear interpolation of ``points`` (integer k → value) at x, clamped to the ends."""
    ks = sorted(points)
    x = min(max(x, ks[0]), ks[-1])
    lo = max(k for k in ks if k <= x)
    hi = min(k for k in ks if k >= x)
    if lo == hi:
        return points[lo]
    return points[lo] + (points[hi] - points[lo]) * (x - lo) / (hi - lo)


def best_adaptive(summaries: List[Summary], tolerance: float, kinds=("estimator", "confidence")) -> Optional[Summary]:
    """The fastest adaptive row whose BLEU is within ``tolerance`` of row 1's."""
    base = summaries[0].bleu
    good = [s for s in summaries if s.kind in kinds and s.bleu >= base - tolerance]
    return max(good, key=lambda s: s.speedup) if good else None


# ---- reporting -----------------------------------------------------------------------------------


def markdown_table(summaries: List[Summary]) -> str:
    lines = ["| row | tokens/s | sent/s | BLEU | len | AE | compute AE | MFLOPs/tok | speedup | ideal | efficiency "
             "| eff. at compute AE |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def fmt(x, spec):
        return "" if x != x else format(x, spec)  # NaN → blank

    for s in summaries:
        lines.append(f"| {s.name} | {s.tokens_per_s:.0f} | {s.sentences_per_s:.1f} | {s.bleu:.2f} | {s.length:.1f} | "
                     f"{s.ae:.2f} | {fmt(s.compute_ae, '.2f')} | {s.mflops:.2f} | {s.speedup:.2f} | "
                     f"{fmt(s.ideal, '.2f')} | {fmt(s.efficiency, '.2f')} | {fmt(s.efficiency_cae, '.2f')} |")
    return "\n".join(lines)


def result_line(summaries: List[Summary], tolerance: float, kinds=("estimator", "confidence")) -> str:
    """RESULT over the adaptive rows (``kinds``; add "fixed" to let --fixed-exit settings compete), with
    where the engine stands: ``ct2_f32`` / ``ct2_int8`` (CTranslate2 at full depth, speedup against row 1)
    and ``eff_min``, the lowest efficiency over the estimator rows (stragglers: a few rows that go deep;
    confidence thresholding is left out: it projects onto the vocabulary at every block a row visits,
    work the limit rows never do)."""
    base = summaries[0]
    ours = next((s for s in summaries if s.kind == "ours"), None)
    overhead = base.tokens_per_s / ours.tokens_per_s if ours else float("nan")  # time(row 2) / time(row 1) per token
    engine = {name: next((s.speedup for s in summaries if s.kind == "ct2" and s.name == f"ct2 {name}"), float("nan"))
              for name in ("float32", "int8")}
    efficiencies = [s.efficiency for s in summaries if s.kind == "estimator" and s.efficiency == s.efficiency]
    tail = (f"overhead={overhead:.4f} ct2_f32={engine['float32']:.4f} ct2_int8={engine['int8']:.4f} "
            f"eff_min={min(efficiencies) if efficiencies else float('nan'):.4f}")
    tail += bf16_result_fields(summaries, tolerance)
    best = best_adaptive(summaries, tolerance, kinds)
    if best is None:
        return f"RESULT speedup=nan ideal=nan efficiency=nan bleu_delta=nan ae=nan {tail}"
    return (f"RESULT speedup={best.speedup:.4f} ideal={best.ideal:.4f} efficiency={best.efficiency:.4f} "
            f"bleu_delta={best.bleu - base.bleu:.4f} ae={best.ae:.4f} {tail}")


def bf16_result_fields(summaries: List[Summary], tolerance: float) -> str:
    """`` bf16_full=… bf16_best=… bf16_bleu_delta=… bf16_ae=…`` when the run has --autocast-bf16 rows: our
    full depth in bfloat16, and the fastest bfloat16 row (full, fixed or estimator) within ``tolerance``
    BLEU of row 1 (fairseq, float32)."""
    full = next((s for s in summaries if s.kind == "bf16-ours"), None)
    if full is None:
        return ""
    best = best_adaptive(summaries, tolerance, BF16_KINDS)
    if best is None:
        return f" bf16_full={full.speedup:.4f} bf16_best=nan bf16_bleu_delta=nan bf16_ae=nan"
    return (f" bf16_full={full.speedup:.4f} bf16_best={best.speedup:.4f} "
            f"bf16_bleu_delta={best.bleu - summaries[0].bleu:.4f} bf16_ae={best.ae:.4f}")


def write_plot(per_setting: Dict[str, List[Summary]], path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"fairseq": "s", "ours": "D", "fixed": "P", "limit": "o", "estimator": "^", "confidence": "v",
               "ct2": "x", "ct2-stream-full": "X", "ct2-exit": "1", "ct2-adaptive": "*"}
    fig, axes = plt.subplots(1, len(per_setting), figsize=(6 * len(per_setting), 4.5), squeeze=False)
    for ax, (setting, summaries) in zip(axes[0], per_setting.items()):
        for kind, marker in markers.items():
            points = [s for s in summaries if s.kind == kind]
            if kind == "limit":  # the limit curve ends at full depth (row 1)
                points = sorted(points + summaries[:1], key=lambda s: s.ae)
            if points:
                ax.plot([s.tokens_per_s for s in points], [s.bleu for s in points], marker=marker,
                        linestyle="-" if kind in ("limit", "estimator", "confidence") else "", label=kind)
        for s in summaries:
            ax.annotate(s.name.split(" ", 1)[-1], (s.tokens_per_s, s.bleu), fontsize=6,
                        textcoords="offset points", xytext=(3, 3))
        ax.set_title(setting)
        ax.set_xlabel("tokens/s")
        ax.set_ylabel("BLEU")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the benchmark -------------------------------------------------------------------------------


@dataclass
class Context:
    model: nn.Module
    model_args: object
    task: object
    dims: DecoderDims
    limits: Dict[int, nn.Module]
    ct2: Optional[Tuple[object, str]]
    ct2_exits: Optional[str] = None  # fairseq_dat.ctranslate2 export of every exit (ct2 exit/adaptive rows)


@dataclass
class Search:
    """Beam search settings shared by every row of a setting. ``fixed_length`` L forces every output
    to L tokens plus EOS (min = max length), so that time per token compares like with like."""

    beam: int
    max_len_b: int
    fixed_length: Optional[int] = None
    max_len_a: float = 0.0

    def length_limit(self):
        """(a, b): each batch generates at most a · S + b tokens, S its longest source with EOS."""
        return (0.0, self.fixed_length) if self.fixed_length else (self.max_len_a, self.max_len_b)

    def fairseq_kwargs(self) -> dict:
        a, b = self.length_limit()
        kwargs = {"beam_size": self.beam, "max_len_a": a, "max_len_b": b}
        return {**kwargs, "min_len": self.fixed_length} if self.fixed_length else kwargs

    def ct2_kwargs(self, src_len: int) -> dict:
        """``Translator.translate_batch`` options for one batch whose longest source has src_len tokens
        with EOS: fairseq's length limit of that batch (fairseq_dat.ctranslate2.fairseq_max_len)."""
        from fairseq_dat.ctranslate2 import fairseq_max_len

        kwargs = {"beam_size": self.beam, "max_decoding_length": fairseq_max_len(*self.length_limit(), src_len)}
        return {**kwargs, "min_decoding_length": self.fixed_length} if self.fixed_length else kwargs

    def translator_kwargs(self) -> dict:
        """``AdaptiveTranslator.translate`` options (it applies the limit per batch itself)."""
        a, b = self.length_limit()
        kwargs = {"beam": self.beam, "max_len_a": a, "max_len_b": b}
        return {**kwargs, "min_decoding_length": self.fixed_length} if self.fixed_length else kwargs


def ct2_full_depth_rows(ctx: Context, search: Search, args, sources) -> List[Row]:
    """``ct2 float32`` / ``ct2 int8``: CTranslate2 on the full-depth model, per batch (none without it)."""
    if ctx.ct2 is None:
        return []
    ctranslate2, model_dir = ctx.ct2
    rows: List[Row] = []
    for compute_type in CT2_COMPUTE_TYPES:
        translator = ctranslate2.Translator(model_dir, device="cpu", compute_type=compute_type,
                                            inter_threads=1, intra_threads=args.threads)
        rows.append(CT2Row(f"ct2 {compute_type}", translator, sources, ctx.task.target_dictionary, search,
                           ctx.dims.num_layers))
    return rows


def ct2_comparison_rows(ctx: Context, search: Search, args, est_thresholds, sources) -> List[Row]:
    """``--rows ct2``: fairseq at full depth (the reference), CTranslate2 at full depth per batch, and
    every exit and estimator threshold streamed."""
    tgt_dict, n = ctx.task.target_dictionary, ctx.dims.num_layers
    rows: List[Row] = [FairseqRow("fairseq full", "fairseq", ctx.limits[n], tgt_dict, search, n)]
    rows += ct2_full_depth_rows(ctx, search, args, sources)
    return rows + ct2_adaptive_rows(ctx, search, args, est_thresholds, sources, list(range(1, n)))


def build_rows(ctx: Context, search: Search, args, est_thresholds, conf_thresholds, sources,
               fixed_exits: Optional[List[int]] = None, kv_rows: bool = True) -> List[Row]:
    tgt_dict, n = ctx.task.target_dictionary, ctx.dims.num_layers
    if args.rows == "ct2":
        return ct2_comparison_rows(ctx, search, args, est_thresholds, sources)
    rows: List[Row] = [FairseqRow("fairseq full", "fairseq", ctx.limits[n], tgt_dict, search, n),
                       AdaptiveRow("ours (no flags)", "ours", ctx.model, tgt_dict, search),
                       AdaptiveRow(f"ours fixed={n}", "ours", ctx.model, tgt_dict, search, fixed_exit=n)]
    rows += [FairseqRow(f"limit k={k}", "limit", ctx.limits[k], tgt_dict, search, k) for k in range(1, n)]
    # the same exits through the exit-aware loop: efficiency at integer AE; eager = K/V of skipped blocks at once
    fixed_exits = list(range(1, n)) if fixed_exits is None else fixed_exits
    rows += [AdaptiveRow(f"ours fixed={k}", "fixed", ctx.model, tgt_dict, search, fixed_exit=k) for k in fixed_exits]
    if kv_rows:
        rows.append(AdaptiveRow("ours fixed=1 eager K/V", "fixed-eager", ctx.model, tgt_dict, search, fixed_exit=1,
                                exit_kv="eager"))
    rule = exit_rule("estimator", ctx.model.decoder.depth_estimator.name) if est_thresholds else "none"
    if est_thresholds and kv_rows:
        rows.append(AdaptiveRow(f"estimator T={est_thresholds[0]:g} eager K/V", "estimator-eager", ctx.model, tgt_dict,
                                search, flops_rule=rule, exit_strategy="estimator",
                                exit_threshold=str(est_thresholds[0]), exit_kv="eager"))
    if est_thresholds and kv_rows and ctx.model.decoder.depth_estimator.level == "sequence":
        # the sentences in fairseq's batch order (each block's rows gathered) instead of deepest first
        rows.append(AdaptiveRow(f"estimator T={est_thresholds[0]:g} batch order", "estimator-batch-order", ctx.model,
                                tgt_dict, search, flops_rule=rule, exit_strategy="estimator",
                                exit_threshold=str(est_thresholds[0]), exit_sequence_order="batch"))
    rows += [AdaptiveRow(f"estimator T={t:g}", "estimator", ctx.model, tgt_dict, search,
                         flops_rule=rule, exit_strategy="estimator", exit_threshold=str(t)) for t in est_thresholds]
    rows += [AdaptiveRow(f"confidence T={t:g}", "confidence", ctx.model, tgt_dict, search,
                         flops_rule=exit_rule("confidence"), exit_strategy="confidence", exit_threshold=str(t))
             for t in conf_thresholds]
    if getattr(args, "autocast_bf16", False):
        rows += bf16_rows(ctx, search, fixed_exits, est_thresholds, rule)
    rows += ct2_full_depth_rows(ctx, search, args, sources)
    rows += ct2_adaptive_rows(ctx, search, args, est_thresholds, sources, fixed_exits)
    return rows


def bf16_rows(ctx: Context, search: Search, fixed_exits: List[int], est_thresholds, rule: str) -> List[Row]:
    """Our generator under ``--autocast-bf16``: full depth, each fixed exit, each estimator threshold."""
    tgt_dict, model = ctx.task.target_dictionary, ctx.model
    rows: List[Row] = [AdaptiveRow("bf16 full", "bf16-ours", model, tgt_dict, search, autocast_bf16=True)]
    rows += [AdaptiveRow(f"bf16 fixed={k}", "bf16-fixed", model, tgt_dict, search, fixed_exit=k, autocast_bf16=True)
             for k in fixed_exits]
    rows += [AdaptiveRow(f"bf16 estimator T={t:g}", "bf16-estimator", model, tgt_dict, search, flops_rule=rule,
                         exit_strategy="estimator", exit_threshold=str(t), autocast_bf16=True) for t in est_thresholds]
    return rows


def load_context(args, workdir: str) -> Context:
    models, saved_cfg, task = checkpoint_utils.load_model_ensemble_and_task([args.path],
                                                                            arg_overrides={"data": args.data})
    model = models[0].eval()
    if not hasattr(model.decoder, "exit_logits"):
        raise SystemExit(f"{args.path} is not an adaptive_transformer checkpoint")
    task.load_dataset(args.subset)
    n = model.decoder.num_layers
    limits = {k: truncated_stock_model(model, saved_cfg.model, task, k) for k in range(1, n + 1)}
    ct2 = None
    if args.no_ct2:
        print("CTranslate2 rows skipped: --no-ct2")
    else:
        module, where = convert_to_ct2(model, saved_cfg.model, task, args.data, workdir)
        if module is None:
            print(f"CTranslate2 rows skipped: {where}")
        else:
            ct2 = (module, where)
    return Context(model, saved_cfg.model, task, DecoderDims.of_model(model), limits, ct2)


def check_reference_rows(rows: List[Row]):
    """Our full-depth rows must decode exactly fairseq's tokens; CTranslate2 float32 should."""
    reference = {o.sample_id: o.tokens for o in rows[0].outputs}
    for row in rows[1:]:
        if row.kind == "ours" or row.name == "ct2 float32":
            same = sum(reference[o.sample_id] == o.tokens for o in row.outputs)
            if same != len(reference):
                print(f"{'WARNING: ' if row.kind == 'ours' else ''}{row.name} differs from fairseq's output on "
                      f"{len(reference) - same}/{len(reference)} sentences")


def run_setting(ctx: Context, args, batch_size: int, beam: int, est_thresholds, conf_thresholds, sources,
                referee, fixed_exits: Optional[List[int]] = None, kv_rows: bool = True) -> List[Summary]:
    limit = args.batch1_sentences if batch_size == 1 and args.batch1_sentences else args.max_sentences
    batches = load_batches(ctx.task, [ctx.model], args.subset, batch_size, limit)
    decoded = {sid: sources[sid] for b in batches for sid in b["id"].tolist() if sid in sources}
    rows = build_rows(ctx, Search(beam, args.max_len_b, args.fixed_length, args.max_len_a), args, est_thresholds, conf_thresholds,
                      decoded, fixed_exits, kv_rows)
    nsent = sum(len(b["id"]) for b in batches)
    print(f"\n== beam {beam}, batch {batch_size}: {nsent} sentences in {len(batches)} batches, {len(rows)} rows "
          f"x {args.repeats} interleaved passes", flush=True)
    begin = time.perf_counter()
    measure(rows, batches, args.repeats)
    src_lengths = {int(sid): int(length) for b in batches
                   for sid, length in zip(b["id"].tolist(), b["net_input"]["src_lengths"].tolist())}
    summaries = [summarize(row, referee, ctx.dims, src_lengths) for row in rows]
    n = ctx.dims.num_layers
    limit_tpt = {s.exit_block: 1.0 / s.tokens_per_s for s in summaries if s.kind == "limit"}
    limit_tpt[n] = 1.0 / summaries[0].tokens_per_s
    add_speedups(summaries, limit_tpt)
    check_reference_rows(rows)
    print(f"(measured in {time.perf_counter() - begin:.0f} s)")
    return summaries


def carried_row(summaries: List[Summary], kind: str, tolerance: float) -> Optional[Summary]:
    """The first setting's best row of one kind, whose threshold or exit later settings rerun (--quick)."""
    best = best_adaptive(summaries, tolerance, kinds=(kind,))
    if best is None:  # none within tolerance: the most conservative one
        candidates = [s for s in summaries if s.kind == kind]
        best = max(candidates, key=lambda s: s.bleu) if candidates else None
    return best


def main(argv=None):
    args = parse_args(argv)
    quiet_root_logger()  # keep fairseq's loading chatter out of the tables
    warnings.filterwarnings("ignore", message=".*(pin_memory|weights_only).*")
    torch.set_num_threads(args.threads)
    machine = machine_description(args.threads)
    print(f"machine: {machine}")
    load = os.getloadavg()
    print(f"load average before start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    with tempfile.TemporaryDirectory(prefix="dat-bench-") as workdir:
        ctx = load_context(args, workdir)
        ctx.ct2_exits = export_ct2_exits(ctx, workdir)
        quiet_root_logger()  # loading the checkpoint through hydra turned it up again
        est = parse_sweep_values(args.estimator_thresholds, "--estimator-thresholds") \
            if ctx.model.decoder.depth_estimator is not None else []
        if not est:
            print("estimator rows skipped: the checkpoint has no trained depth estimator")
        conf = parse_sweep_values(args.confidence_thresholds, "--confidence-thresholds")
        dataset = ctx.task.dataset(args.subset)
        sources = ct2_sources(dataset, ctx.task.source_dictionary) if ctx.ct2 else {}
        referee = BleuReferee(dataset, ctx.task.target_dictionary)
        print(f"model: {args.path}; decoder N={ctx.dims.num_layers} d={ctx.dims.embed_dim} "
              f"d_f={ctx.dims.ffn_dim} d_e={ctx.dims.encoder_dim} V={ctx.dims.vocab}; "
              f"encoder layers {len(ctx.model.encoder.layers)}")
        per_setting: Dict[str, List[Summary]] = {}
        fixed, kv_rows = None, True
        for i, (batch_size, beam) in enumerate(args.settings):
            summaries = run_setting(ctx, args, batch_size, beam, est, conf, sources, referee, fixed, kv_rows)
            name = f"beam {beam}, batch {batch_size}"
            per_setting[name] = summaries
            print(markdown_table(summaries))
            print(f"BEST {name}: {result_line(summaries, args.bleu_tolerance)[len('RESULT '):]}", flush=True)
            print(f"BEST incl. fixed exits {name}: "
                  f"{result_line(summaries, args.bleu_tolerance, FIXED_TOO)[len('RESULT '):]}", flush=True)
            print("\n".join(ct2_relative_lines(summaries, args.bleu_tolerance)), flush=True)
            if i == 0 and not args.full_sweep_everywhere:
                best = {kind: carried_row(summaries, kind, args.bleu_tolerance)
                        for kind in ("estimator", "confidence", "fixed")}
                est = [best["estimator"].threshold] if best["estimator"] else []
                conf = [best["confidence"].threshold] if best["confidence"] else []
                fixed = [best["fixed"].exit_block] if best["fixed"] else [1]
                kv_rows = False  # the eager K/V comparison: first setting only
    write_reports(args, machine, per_setting)
    print(result_line(next(iter(per_setting.values())), args.bleu_tolerance))


def write_reports(args, machine: str, per_setting: Dict[str, List[Summary]]):
    os.makedirs(args.out_dir, exist_ok=True)
    md_path = os.path.join(args.out_dir, "generation_speed.md")
    png_path = os.path.join(args.out_dir, "generation_speed.png")
    with open(md_path, "w") as f:
        f.write(f"# Generation speed\n\nmodel `{args.path}`, split `{args.subset}`; {machine}; median of "
                f"{args.repeats} interleaved passes; speedup = tokens/s against row 1\n")
        for name, summaries in per_setting.items():
            f.write(f"\n## {name}\n\n{markdown_table(summaries)}\n\n"
                    f"{result_line(summaries, args.bleu_tolerance)}\n\n"
                    f"with --fixed-exit rows: {result_line(summaries, args.bleu_tolerance, FIXED_TOO)}\n")
            f.write("".join(f"\n{line}\n" for line in ct2_relative_lines(summaries, args.bleu_tolerance)))
    write_plot(per_setting, png_path)
    print(f"\nwrote {md_path} and {png_path}")


if __name__ == "__main__":
    run_main(main)
