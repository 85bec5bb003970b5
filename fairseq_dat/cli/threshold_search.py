"""Search exit thresholds τ on the valid set: BLEU against cost (Elbayad et al., ICLR 2020).

The paper tunes the per-block thresholds of confidence thresholding by **random search** (§3,
"confidence thresholding"): draw τ ~ U(0,1)^{N−1} K times (10,000 in the paper), decode the valid set with
each draw, record BLEU and cost, and keep in every cost bucket the τ with the best BLEU. The
geometric-like halting thresholds τ_n can be tuned the same way (§3.2: "τ_n … tuned on the valid
set"). Cost is the average exit AE (the paper's speed metric), together with ``compute_AE`` (every
beam row at every step) and the Appendix-B decoder FLOPs per token (``fairseq_dat/flops.py``).

    python -m fairseq_dat.cli.threshold_search DATA --path CKPT [--strategy estimator|confidence]
        [--mode sweep|random] [--thresholds 0.1,0.2,...] [--samples 200] [--buckets 10]
        [--valid-subset valid] [--test-subset test] [--calibrate --max-bleu-drop 0.5]
        [--beam 5] [--batch-size 64] [--max-sentences N] [--out FILE.json] [--plot FILE.png] [--seed 1]

- ``--mode sweep``: one threshold for every block, for each value of ``--thresholds``;
- ``--mode random``: ``--samples`` draws τ ~ U(0,1)^{N−1} (one value for estimators that take one
  threshold: multinomial and Poisson-binomial), and the best BLEU per AE bucket (``--buckets``
  equal bins over [1, N]).

Printed: the BLEU/AE Pareto front of the searched settings and full depth (no exit flags) as the
reference. ``--calibrate`` picks the cheapest setting (lowest AE) whose valid BLEU is at least the
full-depth valid BLEU − ``--max-bleu-drop``, decodes the test subset with it and at full depth, and
prints ``CALIBRATION threshold=… valid_drop=… test_drop=… held=yes|no ae=…`` (ae: test AE).

How decoding matches ``fairseq-generate … --remove-bpe`` exactly: the checkpoint is loaded once, the
batches are fairseq-generate's (``task.get_batch_iterator``: same seed, batch size, order;
``generate_like.generate_batches``), the generator is built by fairseq's ``FairseqTask.build_generator``
with fairseq's generation defaults, and BLEU is fairseq's own scorer fed as ``fairseq_cli/generate.py``
feeds it (``generate_like.GenerateBleu``).
Each batch's encoder runs **once** for all settings (``EncoderReuseEnsembleModel``): the loop is
batch-major, every setting's generator decodes the batch from the same memoized encoder output.

JSON (``--out``), read by ``fairseq_dat.cli.make_tables``: ``{"tool": "threshold_search", "model":
{arch, dims, estimator, oracle, …}, "args": {…}, "points": [{setting, strategy, threshold,
fixed_exit, subset, role, bleu, bleu_string, ae, compute_ae, flops_per_token, flops_rule, tokens,
sentences, exit_hist, decode_seconds, exit_summary}, …], "pareto": [setting labels], "buckets": […],
"calibration": {…} | null}``. ``role`` is reference (full depth), search, fixed (``--with-fixed-exits``),
front-test (``--front-on-test``) or calibration. Setting labels follow make_tables' file names:
``full``, ``exit{n}``, ``thr{T}`` (estimator), ``conf{T}`` (confidence).
"""
import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

import fairseq_dat  # noqa: F401  (registers the plugin before any checkpoint is loaded)
from fairseq import checkpoint_utils
from fairseq.dataclass.configs import GenerationConfig
from fairseq.tasks import FairseqTask

from . import quiet_root_logger, run_main
from .generate_like import GenerateBleu, generate_batches
from ..errors import ConfigError
from ..exit_summary import ExitSummary
from ..flops import DecoderDims, decoder_flops, exit_rule
from ..modules.depth_estimators import single_threshold
from ..sequence_generator import AdaptiveEnsembleModel, AdaptiveSequenceGenerator


# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One decoding configuration: ``strategy`` as ``--exit-strategy``, with its threshold or exit."""

    strategy: str  # full | fixed | estimator | confidence | uniform
    threshold: Optional[str] = None  # "0.5" or N−1 comma-separated values
    fixed_exit: Optional[int] = None  # 1-based block

    @property
    def label(self) -> str:
        """The setting's name in file names and tables: full, uniform, exit{n}, thr{T} or conf{T}."""
        if self.strategy in ("full", "uniform"):
            return self.strategy
        if self.strategy == "fixed":
            return f"exit{self.fixed_exit}"
        return LABEL_PREFIXES[self.strategy] + self.threshold

    @classmethod
    def from_label(cls, label: str) -> Optional["Setting"]:
        """The setting a label names (``generate-<subset>-<label>.log`` of the recipes), else None."""
        if label in ("full", "uniform"):
            return cls(label)
        m = re.fullmatch(r"exit(\d+)", label)
        if m:
            return cls("fixed", fixed_exit=int(m.group(1)))
        for strategy, prefix in LABEL_PREFIXES.items():
            if label.startswith(prefix) and len(label) > len(prefix):
                return cls(strategy, label[len(prefix):])
        return None

    def generator_kwargs(self) -> dict:
        return {"exit_strategy": self.strategy, "exit_threshold": self.threshold, "fixed_exit": self.fixed_exit}


LABEL_PREFIXES = {"estimator": "thr", "confidence": "conf"}
FULL_DEPTH = Setting("full")


def format_thresholds(values: Sequence[float]) -> str:
    return ",".join(f"{v:.4g}" for v in values)


def parse_sweep_values(text: str, flag: str = "--thresholds") -> List[float]:
    """``--thresholds 0.1,0.2``: comma-separated values, each one ``--exit-threshold`` for every block
    (checked by the ``--exit-threshold`` parser, ``depth_estimators.single_threshold``)."""
    try:
        return [single_threshold(part, "sweep") for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} must be numbers in [0, 1] separated by commas, got {text!r}") from None


def sweep_settings(strategy: str, values: Sequence[float]) -> List[Setting]:
    """``--mode sweep``: one threshold shared by all blocks, per value."""
    return [Setting(strategy, format_thresholds([v])) for v in values]


def random_settings(strategy: str, arity: int, samples: int, seed: int) -> List[Setting]:
    """``--mode random``: ``samples`` draws τ ~ U(0,1)^arity (§3, confidence thresholding)."""
    rng = np.random.default_rng(seed)
    return [Setting(strategy, format_thresholds(rng.uniform(0.0, 1.0, size=arity))) for _ in range(samples)]


def fixed_exit_settings(num_exits: int) -> List[Setting]:
    return [Setting("fixed", fixed_exit=n) for n in range(1, num_exits)]


def threshold_arity(decoder, strategy: str) -> int:
    """How many thresholds a setting takes: N−1 per-block τ_n (confidence, token-geometric) or one
    cumulative-probability threshold (multinomial, Poisson-binomial)."""
    if strategy == "confidence" or decoder.depth_estimator.inputs == "blocks":
        return decoder.num_layers - 1
    return 1


def flops_rule(setting: Setting, decoder) -> str:
    estimator = decoder.depth_estimator.name if decoder.depth_estimator is not None else None
    return exit_rule(setting.strategy, estimator)


# ----------------------------------------------------------------------------------------------
# one encoder pass per batch
# ----------------------------------------------------------------------------------------------


class EncoderMemo:
    """The encoder outputs of the last batch seen, keyed by the batch's source tokens and lengths.

    The search decodes batch-major (every setting decodes batch b before any setting sees b + 1),
    so one entry suffices and memory stays that of one batch. The key is the batch's content, not
    its identity: a different batch can never get a stale encoder output. ``computed`` counts the
    real encoder passes."""

    def __init__(self):
        self.key = None
        self.value = None
        self.computed = 0

    def get(self, net_input: Dict[str, torch.Tensor], compute: Callable):
        key = batch_key(net_input)
        if key != self.key:
            self.value = compute(net_input)
            self.key = key
            self.computed += 1
        return self.value


def batch_key(net_input: Dict[str, torch.Tensor]) -> tuple:
    src, lengths = net_input["src_tokens"], net_input["src_lengths"]
    return tuple(src.shape), src.cpu().numpy().tobytes(), lengths.cpu().numpy().tobytes()


class EncoderReuseEnsembleModel(AdaptiveEnsembleModel):
    """``forward_encoder`` through a shared :class:`EncoderMemo`.

    Safe because fairseq's search never writes into the encoder output: ``_generate`` expands it
    to the beam with ``reorder_encoder_out`` (new tensors) and the decoder keeps its lazily
    projected source keys/values in the incremental state, which is fresh per ``_generate``."""

    def __init__(self, models, memo: EncoderMemo):
        super().__init__(models)
        self.memo = memo

    def forward_encoder(self, net_input: Dict[str, torch.Tensor]):
        return self.memo.get(net_input, super().forward_encoder)


class SearchGenerator(AdaptiveSequenceGenerator):
    """``AdaptiveSequenceGenerator`` whose ensemble reads encoder outputs from ``encoder_memo``."""

    def __init__(self, models, tgt_dict, encoder_memo: EncoderMemo, **kwargs):
        super().__init__(models, tgt_dict, **kwargs)
        ensemble = EncoderReuseEnsembleModel(models, encoder_memo)
        ensemble.stats = self.stats
        ensemble.eval()
        self.model = ensemble


# ----------------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------------


class SettingRun:
    """One setting's generator and its running totals (BLEU statistics, FLOPs, time)."""

    def __init__(self, setting: Setting, generator, scorer: GenerateBleu, dims: DecoderDims, rule: str):
        self.setting, self.generator, self.scorer = setting, generator, scorer
        self.dims, self.rule = dims, rule
        self.flops = self.tokens = self.sentences = 0
        self.seconds = 0.0

    def decode(self, models, sample):
        start = time.perf_counter()
        hypos = self.generator.generate(models, sample)
        self.seconds += time.perf_counter() - start
        self.scorer.add_batch(sample, hypos)
        for i, src_len in enumerate(sample["net_input"]["src_lengths"].tolist()):
            exits = hypos[i][0]["exits"].tolist()
            self.flops += decoder_flops(self.dims, exits, src_len, self.rule)
            self.tokens += len(exits)
        self.sentences += sample["id"].numel()

    def point(self, subset: str, role: str) -> dict:
        stats, s = self.generator.stats, self.setting
        return {"setting": s.label, "strategy": s.strategy, "threshold": s.threshold, "fixed_exit": s.fixed_exit,
                "subset": subset, "role": role, "bleu": self.scorer.score(),
                "bleu_string": self.scorer.result_string(), "ae": stats.average_exit,
                "compute_ae": stats.compute_average_exit,
                "flops_per_token": self.flops / self.tokens if self.tokens else float("nan"),
                "flops_rule": self.rule, "tokens": self.tokens, "sentences": self.sentences,
                "exit_hist": [int(c) for c in stats.token_hist], "decode_seconds": round(self.seconds, 3),
                "exit_summary": ExitSummary.of_stats(stats).line()}


def generation_config(beam: int, lenpen: float, max_len_a: float, max_len_b: int, min_len: int):
    """fairseq's ``GenerationConfig`` defaults with this tool's flags."""
    gen = GenerationConfig()
    gen.beam, gen.lenpen, gen.max_len_a, gen.max_len_b, gen.min_len = beam, lenpen, max_len_a, max_len_b, min_len
    return gen


class SearchSession:
    """A loaded checkpoint, its task and generation settings; decodes subsets for many settings."""

    def __init__(self, data: str, path: str, gen: GenerationConfig, batch_size: Optional[int],
                 max_tokens: Optional[int], max_sentences: Optional[int], seed: int, post_process: Optional[str]):
        self.models, self.cfg, self.task = load_checkpoint(data, path)
        self.path, self.data, self.gen = path, data, gen
        self.batch_size, self.max_tokens, self.max_sentences, self.seed = batch_size, max_tokens, max_sentences, seed
        self.post_process = post_process
        for model in self.models:
            model.prepare_for_inference_(SimpleNamespace(generation=gen))
        self.decoder = self.models[0].decoder
        self.dims = DecoderDims.of_model(self.models[0])
        self.memo = EncoderMemo()

    def batches(self, subset: str, flag: str) -> list:
        """fairseq-generate's batches of ``subset`` (``--max-sentences`` N: the sentences with id < N)."""
        return generate_batches(self.task, self.models, load_subset(self.task, subset, flag), self.batch_size,
                                self.max_tokens, first_n=self.max_sentences, seed=self.seed)

    def build_run(self, setting: Setting) -> SettingRun:
        extra = dict(setting.generator_kwargs(), encoder_memo=self.memo)
        generator = FairseqTask.build_generator(self.task, self.models, self.gen, seq_gen_cls=SearchGenerator,
                                                extra_gen_cls_kwargs=extra)
        scorer = GenerateBleu.for_generator(generator, self.task.target_dictionary, self.post_process)
        return SettingRun(setting, generator, scorer, self.dims, flops_rule(setting, self.decoder))

    def evaluate(self, subset: str, flag: str, settings: Sequence[Setting], roles: Sequence[str],
                 progress: bool = False) -> List[dict]:
        """Decode ``subset`` with every setting, batch-major (one encoder pass per batch)."""
        batches = self.batches(subset, flag)
        runs = [self.build_run(s) for s in settings]
        with torch.no_grad():
            for b, sample in enumerate(batches):
                for run in runs:
                    run.decode(self.models, sample)
                if progress:
                    print(f"  {subset}: batch {b + 1}/{len(batches)} decoded with {len(runs)} settings",
                          file=sys.stderr, flush=True)
        return [run.point(subset, role) for run, role in zip(runs, roles)]

    def describe_model(self) -> dict:
        return describe_model(self.models[0], self.cfg)


def load_checkpoint(data: str, path: str):
    """``load_model_ensemble_and_task`` with ``data`` overridden; one-line errors for bad paths."""
    if not os.path.isdir(data):
        raise ConfigError(f"DATA: {data} is not a directory of binarized data (fairseq-preprocess --destdir)")
    if not os.path.isfile(path):
        raise ConfigError(f"--path: checkpoint {path} not found")
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data})
    if not hasattr(models[0].decoder, "exit_logits"):
        raise ConfigError(f"--path: {path} is a {type(models[0]).__name__} checkpoint; threshold_search needs "
                          "one of --arch adaptive_transformer (or its variants)")
    for model in models:
        model.eval()
    return models, cfg, task


def load_subset(task, subset: str, flag: str):
    """``task.dataset(subset)``, loaded; a missing split is a one-line error naming ``flag``."""
    try:
        task.load_dataset(subset)
    except (FileNotFoundError, ConfigError) as err:  # adaptive_translation raises ConfigError itself
        raise ConfigError(f"{flag} {subset}: {err}") from None
    return task.dataset(subset)


def describe_model(model, cfg) -> dict:
    """What make_tables needs to label a model and count its FLOPs: sizes, estimator, oracle."""
    decoder = model.decoder
    info = {"arch": getattr(cfg.model, "arch", None) or getattr(cfg.model, "_name", None),
            "num_exits": decoder.num_layers, "dims": asdict(DecoderDims.of_model(model)),
            "estimator": getattr(decoder, "depth_estimator_name", "none")}
    criterion = getattr(cfg, "criterion", None)
    for key in ("exit_training", "mixed_samples", "exit_weights", "exit_grad_scale", "depth_oracle",
                "oracle_lambda", "oracle_sigma", "exit_loss_alpha"):
        value = getattr(criterion, key, None) if criterion is not None else None
        info[key] = value if value is None or isinstance(value, (int, float, str)) else str(value)
    return info


# ----------------------------------------------------------------------------------------------
# selection: Pareto front, buckets, calibration
# ----------------------------------------------------------------------------------------------


def _finite(points: Sequence[dict]) -> List[dict]:
    return [p for p in points if math.isfinite(p["ae"]) and math.isfinite(p["bleu"])]


def pareto_front(points: Sequence[dict]) -> List[dict]:
    """Points no other point dominates (AE ≤ and BLEU ≥, one strictly), by increasing AE. Of exact
    duplicates (same AE and BLEU) the first listed is kept."""
    front, best_bleu = [], -math.inf
    for p in sorted(_finite(points), key=lambda p: (p["ae"], -p["bleu"])):
        if p["bleu"] > best_bleu:
            front.append(p)
            best_bleu = p["bleu"]
    return front


def best_per_bucket(points: Sequence[dict], buckets: int, num_exits: int) -> List[dict]:
    """The paper's random-search bookkeeping: ``buckets`` equal AE bins over [1, N]; per bin the
    point with the best BLEU (ties: the lower AE). Returns ``{"bucket", "ae_low", "ae_high",
    "setting", "bleu", "ae"}`` for non-empty bins, cheapest first."""
    width = (num_exits - 1) / buckets if num_exits > 1 else 1.0
    best: Dict[int, dict] = {}
    for p in _finite(points):
        b = min(int((p["ae"] - 1.0) / width), buckets - 1) if width > 0 else 0
        if b not in best or (p["bleu"], -p["ae"]) > (best[b]["bleu"], -best[b]["ae"]):
            best[b] = p
    return [{"bucket": b, "ae_low": 1.0 + b * width, "ae_high": 1.0 + (b + 1) * width,
             "setting": p["setting"], "bleu": p["bleu"], "ae": p["ae"]} for b, p in sorted(best.items())]


def pick_calibrated(points: Sequence[dict], full_bleu: float, max_drop: float) -> Optional[dict]:
    """The cheapest point (lowest AE; ties: higher BLEU) with BLEU ≥ full − max_drop; None if none."""
    eligible = [p for p in _finite(points) if p["bleu"] >= full_bleu - max_drop - 1e-9]
    return min(eligible, key=lambda p: (p["ae"], -p["bleu"])) if eligible else None


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------


def format_table(title: str, rows: Sequence[dict], reference: Optional[dict] = None) -> str:
    head = f"{'setting':<44} {'BLEU':>7} {'AE':>7} {'compute_AE':>10} {'MFLOPs/tok':>11}"
    lines = [title, head, "-" * len(head)]
    for p in rows:
        lines.append(_row(p["setting"], p))
    if reference is not None:
        lines.append(_row("full depth (reference)", reference))
    return "\n".join(lines)


def _row(name: str, p: dict) -> str:
    return (f"{name:<44} {p['bleu']:>7.2f} {p['ae']:>7.3f} {p['compute_ae']:>10.3f} "
            f"{p['flops_per_token'] / 1e6:>11.3f}")


def calibration_line(c: dict) -> str:
    return (f"CALIBRATION threshold={c['threshold']} valid_drop={c['valid_drop']:.2f} "
            f"test_drop={c['test_drop']:.2f} held={'yes' if c['held'] else 'no'} ae={c['ae']:.3f}")


def plot_points(path: str, points: Sequence[dict], front: Sequence[dict], reference: dict, title: str):
    """BLEU vs AE: every searched point, the front, fixed exits and full depth."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    search = [p for p in points if p["role"] == "search"]
    fixed = [p for p in points if p["role"] == "fixed"]
    ax.scatter([p["ae"] for p in search], [p["bleu"] for p in search], s=10, alpha=0.5, label="searched τ")
    ax.plot([p["ae"] for p in front], [p["bleu"] for p in front], "o-", color="C3", label="Pareto front")
    if fixed:
        ax.plot([p["ae"] for p in fixed], [p["bleu"] for p in fixed], "s--", color="C2", label="fixed exits")
    ax.scatter([reference["ae"]], [reference["bleu"]], marker="*", s=150, color="k", label="full depth")
    ax.set_xlabel("average exit (AE)")
    ax.set_ylabel("BLEU")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fairseq_dat.cli.threshold_search",
        description="Search exit thresholds on the valid set (BLEU vs AE/FLOPs), paper §3. "
                    "Decodes as fairseq-generate --task adaptive_translation --remove-bpe.")
    p.add_argument("data", metavar="DATA", help="binarized data directory (fairseq-preprocess --destdir)")
    p.add_argument("--path", required=True, help="adaptive_transformer checkpoint")
    p.add_argument("--strategy", choices=("estimator", "confidence"), default="estimator",
                   help="thresholds of the checkpoint's depth estimator (--exit-strategy estimator) or of "
                        "confidence thresholding (max probability of C_n > τ_n)")
    p.add_argument("--mode", choices=("sweep", "random"), default="sweep",
                   help="sweep: one threshold for all blocks per --thresholds value; random: --samples draws "
                        "τ ~ U(0,1)^{N-1}, best BLEU per AE bucket (the paper's procedure)")
    p.add_argument("--thresholds", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
                   help="sweep values in [0, 1], comma-separated")
    p.add_argument("--samples", type=int, default=200, help="random draws (the paper used 10,000)")
    p.add_argument("--buckets", type=int, default=10, help="random mode: equal AE buckets over [1, N]")
    p.add_argument("--with-fixed-exits", action="store_true",
                   help="also decode fixed exits 1..N-1 as reference points (not part of the front)")
    p.add_argument("--valid-subset", default="valid", help="subset the search decodes")
    p.add_argument("--test-subset", default="test", help="subset --calibrate and --front-on-test decode")
    p.add_argument("--calibrate", action="store_true",
                   help="pick the cheapest setting within --max-bleu-drop of full depth on the valid subset, "
                        "check the drop on the test subset, print a CALIBRATION line")
    p.add_argument("--max-bleu-drop", type=float, default=0.5, help="--calibrate: allowed BLEU drop D >= 0")
    p.add_argument("--front-on-test", action="store_true",
                   help="also decode the Pareto-front settings on the test subset (the paper's reported points)")
    p.add_argument("--beam", type=int, default=5, help="beam size (fairseq-generate --beam)")
    p.add_argument("--lenpen", type=float, default=1.0, help="length penalty (fairseq-generate --lenpen)")
    p.add_argument("--max-len-a", type=float, default=0.0, help="fairseq-generate --max-len-a")
    p.add_argument("--max-len-b", type=int, default=200, help="fairseq-generate --max-len-b")
    p.add_argument("--min-len", type=int, default=1, help="fairseq-generate --min-len")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch (fairseq-generate --batch-size)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per batch (fairseq-generate --max-tokens)")
    p.add_argument("--max-sentences", type=int, default=None,
                   help="decode only sentences with id < N of each subset (NOT fairseq's alias of --batch-size)")
    p.add_argument("--remove-bpe", default="subword_nmt",
                   help="post-processing before BLEU, as fairseq-generate --remove-bpe/--post-process; "
                        "'none' scores the raw tokens")
    p.add_argument("--out", help="write every point as JSON (input of fairseq_dat.cli.make_tables)")
    p.add_argument("--plot", help="write a BLEU vs AE PNG")
    p.add_argument("--seed", type=int, default=1,
                   help="random draws, and batch order as fairseq-generate --seed (default 1 as fairseq)")
    p.add_argument("--describe-model", action="store_true",
                   help="only write the checkpoint's sizes/estimator/oracle (make_tables' model.json) to "
                        "--out and exit")
    p.add_argument("--progress", action="store_true", help="print a line per decoded batch to stderr")
    return p


def check_args(args):
    """One-line errors naming the flag, before loading anything."""
    positive = {"--samples": args.samples, "--buckets": args.buckets, "--beam": args.beam,
                "--batch-size": args.batch_size, "--max-tokens": args.max_tokens,
                "--max-sentences": args.max_sentences}
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {value}")
    if not (math.isfinite(args.max_bleu_drop) and args.max_bleu_drop >= 0):
        raise ConfigError(f"--max-bleu-drop must be a finite number >= 0, got {args.max_bleu_drop}")
    if args.describe_model and not args.out:
        raise ConfigError("--describe-model needs --out FILE.json")
    for flag, path in (("--out", args.out), ("--plot", args.plot)):
        if path and os.path.dirname(path) and not os.path.isdir(os.path.dirname(path)):
            raise ConfigError(f"{flag}: directory {os.path.dirname(path)} does not exist")
    if args.mode == "sweep":
        parse_sweep_values(args.thresholds)


def search_settings(args, decoder) -> List[Setting]:
    if args.strategy == "estimator" and decoder.depth_estimator is None:
        raise ConfigError("--strategy estimator: this checkpoint has no depth estimator (trained with "
                          "--depth-estimator none/confidence); use --strategy confidence")
    if args.mode == "sweep":
        return sweep_settings(args.strategy, parse_sweep_values(args.thresholds))
    return random_settings(args.strategy, threshold_arity(decoder, args.strategy), args.samples, args.seed)


def run_calibration(session: SearchSession, args, search: List[dict], reference: dict) -> dict:
    """§1.3 tuning with a guarantee check: the cheapest valid setting within D of full depth,
    then the same comparison on the test subset."""
    chosen = pick_calibrated(search, reference["bleu"], args.max_bleu_drop)
    setting = FULL_DEPTH if chosen is None else Setting(chosen["strategy"], chosen["threshold"])
    valid_drop = 0.0 if chosen is None else reference["bleu"] - chosen["bleu"]
    settings = [FULL_DEPTH] if chosen is None else [FULL_DEPTH, setting]
    test = session.evaluate(args.test_subset, "--test-subset", settings, ["calibration"] * len(settings),
                            args.progress)
    test_full, test_chosen = test[0], test[-1]
    test_drop = test_full["bleu"] - test_chosen["bleu"]
    return {"threshold": setting.threshold if chosen is not None else "full", "setting": setting.label,
            "max_bleu_drop": args.max_bleu_drop, "valid_bleu": reference["bleu"] - valid_drop,
            "valid_full_bleu": reference["bleu"], "valid_drop": valid_drop, "test_bleu": test_chosen["bleu"],
            "test_full_bleu": test_full["bleu"], "test_drop": test_drop,
            "held": test_drop <= args.max_bleu_drop + 1e-9, "ae": test_chosen["ae"],
            "valid_ae": reference["ae"] if chosen is None else chosen["ae"], "test_points": test}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    quiet_root_logger()
    check_args(args)
    post_process = None if args.remove_bpe in ("none", "") else args.remove_bpe
    gen = generation_config(args.beam, args.lenpen, args.max_len_a, args.max_len_b, args.min_len)
    session = SearchSession(args.data, args.path, gen, args.batch_size, args.max_tokens, args.max_sentences,
                            args.seed, post_process)
    quiet_root_logger()
    if args.describe_model:
        write_json(args.out, {"tool": "threshold_search", "model": session.describe_model()})
        return {}
    settings = search_settings(args, session.decoder)
    fixed = fixed_exit_settings(session.decoder.num_layers) if args.with_fixed_exits else []
    roles = ["reference"] + ["search"] * len(settings) + ["fixed"] * len(fixed)
    points = session.evaluate(args.valid_subset, "--valid-subset", [FULL_DEPTH] + settings + fixed, roles,
                              args.progress)
    reference, search = points[0], [p for p in points if p["role"] == "search"]
    front = pareto_front(search)
    n = session.decoder.num_layers
    print(format_table(f"Pareto front, {args.valid_subset} ({args.strategy}, {args.mode}, beam {args.beam}, "
                       f"{reference['sentences']} sentences, N={n})", front, reference))
    if fixed:
        print(format_table("Fixed exits", [p for p in points if p["role"] == "fixed"]))
    result = {"tool": "threshold_search", "model": session.describe_model(),
              "args": {k: v for k, v in vars(args).items()}, "points": points,
              "pareto": [p["setting"] for p in front], "calibration": None,
              "buckets": best_per_bucket(search, args.buckets, n) if args.mode == "random" else []}
    if args.front_on_test:
        front_settings = [Setting(p["strategy"], p["threshold"]) for p in front]
        test = session.evaluate(args.test_subset, "--test-subset", [FULL_DEPTH] + front_settings,
                                ["front-test"] * (len(front) + 1), args.progress)
        print(format_table(f"Pareto-front settings on {args.test_subset}", test[1:], test[0]))
        result["points"] += test
    if args.calibrate:
        calibration = run_calibration(session, args, search, reference)
        result["points"] += calibration.pop("test_points")
        result["calibration"] = calibration
        print(calibration_line(calibration))
    if args.out:
        write_json(args.out, result)
    if args.plot:
        plot_points(args.plot, points, front, reference, f"{os.path.basename(args.path)}: {args.valid_subset}")
    return result


def write_json(path: str, obj: dict):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


if __name__ == "__main__":
    run_main(main)
