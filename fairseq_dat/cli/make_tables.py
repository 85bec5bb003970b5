"""Markdown tables and plots of a reproduction run, beside the paper's numbers (Elbayad et al., 2020).

    python -m fairseq_dat.cli.make_tables RUN_DIR --out RESULTS.md [--plots-dir DIR]

Reads (the layout ``examples/common/stages.sh`` writes):

- ``RUN_DIR/<model>/generate-<subset>-<setting>.log``: ``fairseq-generate --task adaptive_translation``
  output (stdout and stderr). ``<model>`` is one of
  ``aligned`` (ω_n = 1), ``baseline-<N>`` (a plain N-block decoder), ``mixed-<M>``,
  ``omega-<n|sqrt_n|inv_sqrt_n|inv_n>`` (``--exit-weights``), ``gamma-<γ>`` (``--exit-grad-scale``),
  ``<estimator>-<LL|C>`` (stage 2: ``geometric``/``token-geometric``, ``token-multinomial``,
  ``sequence``, …; LL = likelihood oracle, C = correctness). ``<setting>`` is ``full`` (no exit
  flags), ``exit<n>`` (``--fixed-exit n``), ``uniform`` (a random exit per token), ``thr<T>``
  (``--exit-threshold T``) or ``conf<T>`` (``--exit-strategy confidence --exit-threshold T``).
  Used: the ``Generate <subset> with beam=…: BLEU4 = …`` line, the ``Adaptive exits (N=…): AE=…``
  line (``fairseq_dat/exit_summary.py``) and, for FLOPs and exit histograms, the ``E-``/``P-``/``S-`` lines.
- ``RUN_DIR/<model>/*.json`` written by ``fairseq_dat.cli.threshold_search --out`` (``"tool":
  "threshold_search"``): BLEU/AE/FLOPs points, and the model's sizes, estimator and oracle.
- ``RUN_DIR/<model>/model.json`` (optional, ``threshold_search DATA --path CKPT --describe-model
  --out RUN_DIR/<model>/model.json``): sizes for the FLOPs of generate logs, estimator and oracle.

Writes ``--out`` with the shapes of Table 1 (valid BLEU: baseline per N, aligned, mixed M = 1, 3, 6;
columns Uniform, n = 1..N, Avg), Appendix Table 2 (ω variants, valid and test), Appendix Table 3
(γ variants), and the operating points of Figures 3 and 5 (BLEU vs AE per estimator × oracle).
N is the largest decoder depth in the run's logs (their ``Adaptive exits (N=…)`` lines) or
threshold_search JSONs, the paper's 6 when none says. Every cell is ``ours / paper``: ours is
measured (the log it came from is listed under the table) or ``not run``; the paper's numbers
(IWSLT14 De-En, N = 6; "–" beyond its 6 blocks) are the ``PAPER_*`` dicts below. PNGs in
``--plots-dir``: BLEU vs AE and BLEU vs FLOPs (Appendix B, ``fairseq_dat/flops.py``) per subset,
and exit histograms.

FLOPs of a generate log (Appendix B) need the model's sizes (model.json or a threshold_search
JSON in the model's directory), per-token exits (``E-`` lines from ``--print-exits``, or the fixed
exit of ``exit<n>``/``full``), the target length (``P-`` line: model tokens, EOS included) and the
source length (``S-`` line + EOS). With ``--remove-bpe`` the ``S-`` line is in words, so |x| is
counted in words: it only enters the 4|x|d terms, a few percent of a block's cost.
"""
import argparse
import glob
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from . import quiet_root_logger, run_main
from .threshold_search import Setting
from ..errors import ConfigError
from ..exit_summary import parse_exit_summary
from ..flops import DecoderDims, decoder_flops, exit_rule

# ----------------------------------------------------------------------------------------------
# the paper's numbers (Elbayad et al. 2020, Table 1, Appendix Tables 2-3, §4 text)
# ----------------------------------------------------------------------------------------------

#: the paper's IWSLT decoder depth; its rows below are Uniform, n=1..6, Avg
PAPER_NUM_EXITS = 6

#: Table 1, IWSLT14 De-En valid BLEU; None = "–" in the paper
PAPER_TABLE1 = {
    "Baseline": [None, 34.2, 35.3, 35.6, 35.7, 35.6, 35.9, 35.4],
    "Aligned (ω=1)": [35.5, 34.1, 35.5, 35.8, 36.1, 36.1, 36.2, 35.6],
    "Mixed M=1": [34.1, 32.9, 34.3, 34.5, 34.5, 34.6, 34.5, 34.2],
    "Mixed M=3": [35.1, 33.9, 35.2, 35.4, 35.5, 35.5, 35.5, 35.2],
    "Mixed M=6": [35.3, 34.2, 35.4, 35.8, 35.9, 35.8, 35.9, 35.5],
}
#: Appendix Table 2 (loss weights ω_n, aligned), valid (a) and test (b)
PAPER_TABLE2 = {
    "valid": {  # the baseline and ω=1 rows are Table 1's
        "Baseline": PAPER_TABLE1["Baseline"],
        "1": PAPER_TABLE1["Aligned (ω=1)"],
        "n": [35.3, 32.2, 35.0, 35.8, 36.0, 36.2, 36.3, 35.2],
        "√n": [35.4, 33.3, 35.2, 35.8, 35.9, 36.1, 36.1, 35.4],
        "1/√n": [35.6, 34.5, 35.4, 35.7, 35.8, 35.8, 35.9, 35.5],
        "1/n": [35.3, 34.7, 35.3, 35.5, 35.7, 35.8, 35.8, 35.5],
    },
    "test": {
        "Baseline": [None, 33.7, 34.6, 34.6, 34.6, 34.6, 34.8, 34.5],
        "1": [34.4, 33.2, 34.4, 34.8, 34.9, 35.0, 34.9, 34.5],
        "n": [34.2, 31.4, 33.8, 34.7, 34.8, 34.8, 34.9, 34.1],
        "√n": [34.4, 32.5, 34.1, 34.8, 34.9, 35.0, 35.1, 34.4],
        "1/√n": [34.6, 33.7, 34.3, 34.6, 34.8, 34.8, 34.9, 34.5],
        "1/n": [34.2, 33.8, 34.3, 34.5, 34.6, 34.7, 34.7, 34.4],
    },
}
#: Appendix Table 3 (gradient scaling γ, aligned); the baseline and Ø rows equal Table 2's ω=1 rows
PAPER_TABLE3 = {
    "valid": {
        "Baseline": PAPER_TABLE2["valid"]["Baseline"],
        "Ø": PAPER_TABLE2["valid"]["1"],
        "0.3": [35.1, 33.7, 34.7, 35.3, 35.7, 35.8, 36.0, 35.2],
        "0.5": [35.4, 34.8, 35.4, 35.6, 35.6, 35.7, 35.6, 35.4],
        "0.7": [34.9, 34.6, 35.1, 35.1, 35.2, 35.4, 35.3, 35.1],
        "0.9": [34.9, 34.8, 35.3, 35.3, 35.3, 35.4, 35.5, 35.3],
        "1.1": [35.1, 34.9, 35.2, 35.3, 35.3, 35.3, 35.3, 35.2],
    },
    "test": {
        "Baseline": PAPER_TABLE2["test"]["Baseline"],
        "Ø": PAPER_TABLE2["test"]["1"],
        "0.3": [34.2, 32.8, 33.9, 34.3, 34.6, 34.8, 35.0, 34.2],
        "0.5": [34.5, 33.8, 34.2, 34.6, 34.5, 34.7, 34.7, 34.6],
        "0.7": [34.0, 33.7, 34.2, 34.3, 34.3, 34.3, 34.3, 34.2],
        "0.9": [34.1, 34.0, 34.2, 34.3, 34.4, 34.4, 34.4, 34.3],
        "1.1": [34.2, 34.0, 34.3, 34.3, 34.3, 34.3, 34.3, 34.2],
    },
}
#: the operating points the text quotes (Figures 3 and 5, test BLEU); AE None = not an AE point
PAPER_OPERATING_POINTS = [
    ("3 (IWSLT)", "Tok-C geometric-like, σ=0, λ=0.1", 34.73, 1.42, "≈ N=6 baseline with 76% fewer blocks"),
    ("3 (IWSLT)", "Best aligned (fixed exit 5)", 34.95, 5.0, ""),
    ("3 (IWSLT)", "Tok-C geometric-like", 34.99, 1.97, "matches best aligned, 61% fewer blocks"),
    ("3 (IWSLT)", "Baseline N=2 / aligned n=2", 34.35, 2.0, "Tok-C geometric-like at AE 1.97 is +0.64"),
    ("5 (WMT)", "Baseline N=6", 43.4, 6.0, ""),
    ("5 (WMT)", "Best aligned", 43.6, None, ""),
    ("5 (WMT)", "Tok-LL geometric-like", 43.4, 2.40, "matches baseline, 40% of the blocks"),
    ("5 (WMT)", "Tok-LL geometric-like", 43.6, 3.25, "matches best aligned"),
    ("5 (WMT)", "Confidence thresholding", 43.4, 2.5, "59% fewer blocks"),
]

#: table rows: (label, model directory); "baseline" = column n from baseline-<n>/…-full.log
TABLE1_ROWS = [("Baseline", "baseline"), ("Aligned (ω=1)", "aligned"), ("Mixed M=1", "mixed-1"),
               ("Mixed M=3", "mixed-3"), ("Mixed M=6", "mixed-6")]
TABLE2_ROWS = [("Baseline", "baseline"), ("1", "aligned"), ("n", "omega-n"), ("√n", "omega-sqrt_n"),
               ("1/√n", "omega-inv_sqrt_n"), ("1/n", "omega-inv_n")]
TABLE3_ROWS = [("Baseline", "baseline"), ("Ø", "aligned")] + [
    (g, f"gamma-{g}") for g in ("0.3", "0.5", "0.7", "0.9", "1.1")]

ESTIMATOR_LABELS = {"token-geometric": "geometric-like", "geometric": "geometric-like",
                    "token-multinomial": "multinomial", "sequence": "Seq", "token-poisson-binomial":
                    "Poisson-binomial", "sequence-poisson-binomial": "Seq Poisson-binomial"}
ORACLE_LABELS = {"likelihood": "LL", "correctness": "C", "LL": "LL", "C": "C"}

LOG_NAME = re.compile(r"^generate-(?P<subset>[^-]+)-(?P<setting>.+)\.log$")

# ----------------------------------------------------------------------------------------------
# fairseq-generate logs
# ----------------------------------------------------------------------------------------------

BLEU_LINE = re.compile(r"^Generate (?P<subset>\S+) with beam=(?P<beam>\d+): (?P<text>BLEU4 = (?P<bleu>[0-9.]+).*)$")
ID_LINE = re.compile(r"^(?P<kind>[SHEP])-(?P<id>\d+)\t(?P<rest>.*)$")  # E-<id>_<step> (history) is skipped


@dataclass
class GenerateLog:
    """What a ``fairseq-generate`` log says. Per-sentence lines keep the first hypothesis only."""

    path: str
    subset: Optional[str] = None
    beam: Optional[int] = None
    bleu: Optional[float] = None
    bleu_string: Optional[str] = None
    num_exits: Optional[int] = None
    ae: Optional[float] = None
    compute_ae: Optional[float] = None
    exit_hist: List[int] = field(default_factory=list)
    sources: Dict[int, str] = field(default_factory=dict)
    exits: Dict[int, List[int]] = field(default_factory=dict)
    scores: Dict[int, List[float]] = field(default_factory=dict)  # P- lines: log2 probabilities


def parse_generate_log(path: str) -> GenerateLog:
    """Parse BLEU, the adaptive-exit summary and the S-/E-/P- lines of one log."""
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read generate log ({err.strerror})") from None
    log = GenerateLog(path)
    for line in lines:
        _parse_line(log, line)
    return log


def _parse_line(log: GenerateLog, line: str):
    m = ID_LINE.match(line)
    if m:
        _parse_sentence_line(log, m.group("kind"), int(m.group("id")), m.group("rest"))
        return
    m = BLEU_LINE.match(line)
    if m:
        log.subset, log.beam = m.group("subset"), int(m.group("beam"))
        log.bleu, log.bleu_string = float(m.group("bleu")), m.group("text")
        return
    summary = parse_exit_summary(line) if log.ae is None else None
    if summary is not None:
        log.num_exits, log.ae, log.compute_ae = summary.num_exits, summary.average_exit, summary.compute_average_exit
        log.exit_hist = list(summary.exit_hist)


def _parse_sentence_line(log: GenerateLog, kind: str, sid: int, rest: str):
    where = f"{log.path}: {kind}-{sid} line"
    try:
        if kind == "S":
            log.sources.setdefault(sid, rest)
        elif kind == "E":
            log.exits.setdefault(sid, [int(v) for v in rest.split()])
        elif kind == "P":
            log.scores.setdefault(sid, [float(v) for v in rest.split()])
    except ValueError:
        raise ConfigError(f"{where} is not a list of numbers: {rest[:60]!r}") from None


# ----------------------------------------------------------------------------------------------
# a run directory
# ----------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One BLEU measurement: a generate log or a threshold_search point."""

    model: str
    subset: str
    setting: str
    bleu: float
    source: str  # file, relative to RUN_DIR
    ae: Optional[float] = None
    compute_ae: Optional[float] = None
    flops: Optional[float] = None
    exit_hist: List[int] = field(default_factory=list)
    role: str = "log"  # log, or threshold_search's role (reference, search, front-test, ...)
    num_exits: Optional[int] = None  # the decoder's N, where the log or JSON says it


@dataclass
class RunDir:
    root: str
    measurements: List[Measurement] = field(default_factory=list)
    models: Dict[str, dict] = field(default_factory=dict)  # model dir → model info (dims, estimator, …)
    incomplete: List[str] = field(default_factory=list)  # logs without a BLEU line

    @property
    def num_exits(self) -> int:
        """N of the tables: the deepest decoder measured, else the paper's."""
        depths = [m.num_exits for m in self.measurements if m.num_exits] + [
            info["num_exits"] for info in self.models.values() if info.get("num_exits")]
        return max(depths, default=PAPER_NUM_EXITS)

    def get(self, model: str, subset: str, setting: str) -> Optional[Measurement]:
        """The generate log of (model, subset, setting), else the same setting decoded by
        threshold_search (full depth or ``--with-fixed-exits``), else None."""
        for roles in (("log",), ("reference", "fixed")):
            for m in self.measurements:
                if (m.model, m.subset, m.setting) == (model, subset, setting) and m.role in roles:
                    return m
        return None


def load_run_dir(root: str) -> RunDir:
    if not os.path.isdir(root):
        raise ConfigError(f"RUN_DIR: {root} is not a directory")
    run = RunDir(root)
    for model_dir in sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))):
        load_model_dir(run, model_dir)
    return run


def load_model_dir(run: RunDir, model: str):
    """model.json / threshold_search JSONs first (sizes for FLOPs), then the generate logs."""
    directory = os.path.join(run.root, model)
    searches = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        data = _read_json(path)
        if not isinstance(data, dict) or data.get("tool") != "threshold_search":
            continue
        if "model" in data:
            run.models.setdefault(model, data["model"])
        searches.append((path, data))
    for path, data in searches:
        run.measurements += search_measurements(model, os.path.relpath(path, run.root), data)
    for path in sorted(glob.glob(os.path.join(directory, "generate-*.log"))):
        m = LOG_NAME.match(os.path.basename(path))
        if not m:
            continue
        log = parse_generate_log(path)
        rel = os.path.relpath(path, run.root)
        if log.bleu is None:
            run.incomplete.append(rel)
            continue
        if log.subset != m.group("subset"):
            raise ConfigError(f"{path}: named for subset {m.group('subset')!r} but its BLEU line is for "
                              f"{log.subset!r}")
        run.measurements.append(log_measurement(model, m.group("setting"), log, rel, run.models.get(model)))


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not a readable JSON file ({err})") from None


def search_measurements(model: str, rel: str, data: dict) -> List[Measurement]:
    """Points of a threshold_search JSON: full depth, the valid Pareto front, fixed exits and every
    test-subset point (front-test, calibration); the other searched points only feed the plots."""
    front = set(data.get("pareto", []))
    num_exits = (data.get("model") or {}).get("num_exits")
    out = []
    for p in data.get("points", []):
        role = p.get("role", "search")
        if role == "search" and p["setting"] not in front:
            role = "search-dominated"
        elif role == "search":
            role = "front"
        out.append(Measurement(model, p["subset"], p["setting"], p["bleu"], rel, p.get("ae"), p.get("compute_ae"),
                               p.get("flops_per_token"), p.get("exit_hist", []), role, num_exits))
    return out


def log_measurement(model: str, setting: str, log: GenerateLog, rel: str, info: Optional[dict]) -> Measurement:
    return Measurement(model, log.subset, setting, log.bleu, rel, log.ae, log.compute_ae,
                       log_flops(log, setting, info), log.exit_hist, num_exits=log.num_exits)


def log_flops(log: GenerateLog, setting: str, info: Optional[dict]) -> Optional[float]:
    """Appendix-B FLOPs per token of a generate log (see the module docstring), or None."""
    if not info or "dims" not in info or not log.scores:
        return None
    dims = DecoderDims(**info["dims"])
    try:
        rule = exit_rule(strategy_of(setting) or "unknown", info.get("estimator"))
    except ValueError:  # thresholds of a model whose estimator the JSON does not name
        return None
    total = tokens = 0
    for sid, scores in log.scores.items():
        exits = sentence_exits(log, sid, setting, len(scores), dims.num_layers)
        if exits is None:
            return None
        src_len = len(log.sources.get(sid, "").split()) + 1
        total += decoder_flops(dims, exits, src_len, rule)
        tokens += len(exits)
    return total / tokens if tokens else None


def strategy_of(label: str) -> Optional[str]:
    """``--exit-strategy`` of a setting label (full, uniform, fixed, estimator, confidence), else None."""
    setting = Setting.from_label(label)
    return setting.strategy if setting is not None else None


def sentence_exits(log: GenerateLog, sid: int, setting: str, length: int, num_layers: int) -> Optional[List[int]]:
    """1-based exits of a sentence's tokens: its E- line, else those its setting fixes."""
    if sid in log.exits:
        return log.exits[sid]
    decoded = Setting.from_label(setting)
    if decoded is not None and decoded.strategy == "full":
        return [num_layers] * length
    if decoded is not None and decoded.strategy == "fixed":
        return [decoded.fixed_exit] * length
    return None


# ----------------------------------------------------------------------------------------------
# Tables 1-3
# ----------------------------------------------------------------------------------------------


@dataclass
class Cell:
    value: Optional[float]
    source: Optional[str]  # a log (relative to RUN_DIR), "mean of n=1..N", or None: not run
    paper: Optional[float]


def columns(num_exits: int) -> List[str]:
    """Table 1 and Appendix Tables 2-3: Uniform, n=1..N, Avg."""
    return ["Uniform"] + [f"n={n}" for n in range(1, num_exits + 1)] + ["Avg"]


def paper_exit_value(paper: Sequence[Optional[float]], n: int) -> Optional[float]:
    """The paper's number for exit n (its rows are Uniform, n=1..6, Avg); None beyond its 6 blocks."""
    return paper[n] if n <= PAPER_NUM_EXITS else None


def table_cells(run: RunDir, model: str, subset: str, paper: Sequence[Optional[float]]) -> List[Cell]:
    """Uniform, n=1..N, Avg of one row. For "baseline", n = the baseline-<n> model at full depth."""
    num_exits = run.num_exits
    cells = [_measured(run, model, subset, "uniform", paper[0]) if model != "baseline" else Cell(None, None, None)]
    for n in range(1, num_exits + 1):
        cells.append(_exit_cell(run, model, subset, n, num_exits, paper_exit_value(paper, n)))
    exits = cells[1:]
    if all(c.value is not None for c in exits):
        cells.append(Cell(sum(c.value for c in exits) / num_exits, f"mean of n=1..{num_exits}", paper[-1]))
    else:
        cells.append(Cell(None, None, paper[-1]))
    return cells


def _exit_cell(run: RunDir, model: str, subset: str, n: int, num_exits: int, paper: Optional[float]) -> Cell:
    if model == "baseline":  # the N=n baseline decodes at its full depth
        return _first(run, [(f"baseline-{n}", "full"), (f"baseline-{n}", f"exit{n}")], subset, paper)
    candidates = [(model, f"exit{n}")] + ([(model, "full")] if n == num_exits else [])
    return _first(run, candidates, subset, paper)


def _first(run: RunDir, candidates, subset: str, paper: Optional[float]) -> Cell:
    for model, setting in candidates:
        m = run.get(model, subset, setting)
        if m is not None:
            return Cell(m.bleu, m.source, paper)
    return Cell(None, None, paper)


def _measured(run: RunDir, model: str, subset: str, setting: str, paper: Optional[float]) -> Cell:
    return _first(run, [(model, setting)], subset, paper)


def format_cell(cell: Cell) -> str:
    ours = f"{cell.value:.2f}" if cell.value is not None else "not run"
    paper = f"{cell.paper:.1f}" if cell.paper is not None else "–"
    if cell.value is None and cell.paper is None and cell.source is None:
        return "–"
    return f"{ours} / {paper}"


def render_table(title: str, run: RunDir, rows, subset: str, paper: Dict[str, list], first_col: str) -> str:
    """A markdown table (cells ``ours / paper``) and the list of the logs each measured cell came from."""
    names = columns(run.num_exits)
    lines = [f"### {title}", "", "| " + " | ".join([first_col] + names) + " |",
             "|" + "---|" * (len(names) + 1)]
    sources = []
    for label, model in rows:
        cells = table_cells(run, model, subset, paper[label])
        lines.append("| " + " | ".join([label] + [format_cell(c) for c in cells]) + " |")
        sources += [f"- {label}, {col}: `{c.source}`" for col, c in zip(names, cells)
                    if c.value is not None and c.source]
    lines += ["", f"Cells: ours / paper ({subset} BLEU). Sources:" if sources else
              f"Cells: ours / paper ({subset} BLEU). Nothing measured yet."]
    return "\n".join(lines + sources + [""])


# ----------------------------------------------------------------------------------------------
# Figures 3 and 5: operating points
# ----------------------------------------------------------------------------------------------


def method_label(model: str, setting: str, info: Optional[dict]) -> Optional[str]:
    """The paper's names: Tok-C geometric-like, Seq-LL, confidence thresholding; None for a
    non-adaptive setting (full depth, fixed exits, uniform)."""
    strategy = strategy_of(setting)
    if strategy == "confidence":
        return "Confidence thresholding"
    if strategy != "estimator":
        return None
    estimator, oracle = (info or {}).get("estimator"), (info or {}).get("depth_oracle")
    m = re.fullmatch(r"(?P<est>.+)-(?P<oracle>LL|C)", model)
    if m:
        estimator = estimator if estimator not in (None, "none") else m.group("est")
        oracle = oracle or m.group("oracle")
    est = ESTIMATOR_LABELS.get(estimator or "", estimator or "estimator")
    orc = ORACLE_LABELS.get(oracle or "", oracle or "?")
    return f"Seq-{orc}" if est == "Seq" else f"Tok-{orc} {est}"


def operating_points(run: RunDir) -> List[Tuple[str, Measurement]]:
    """Adaptive measurements worth listing: generate logs with thr/conf settings, and the
    threshold_search front, front-on-test and calibration points."""
    keep = {"log", "front", "front-test", "calibration"}
    out = []
    for m in run.measurements:
        label = method_label(m.model, m.setting, run.models.get(m.model))
        if label is not None and m.role in keep:
            out.append((label, m))
    return sorted(out, key=lambda lm: (lm[0], lm[1].model, lm[1].subset, lm[1].ae if lm[1].ae is not None else 9))


def render_operating_points(run: RunDir) -> str:
    lines = ["### Figures 3 and 5: operating points (BLEU vs AE per estimator × oracle)", "",
             "| method | model | subset | setting | BLEU | AE | MFLOPs/token | source |",
             "|---|---|---|---|---|---|---|---|"]
    points = operating_points(run)
    for label, m in points:
        lines.append(f"| {label} | {m.model} | {m.subset} | {m.setting} | {m.bleu:.2f} | {_fmt(m.ae, 3)} | "
                     f"{_fmt(m.flops / 1e6 if m.flops else None, 3)} | `{m.source}`"
                     f"{' (' + m.role + ')' if m.role != 'log' else ''} |")
    if not points:
        lines.append("| not run | | | | | | | |")
    lines += ["", "The paper's quoted operating points (test BLEU; the curves themselves are not legible):", "",
              "| figure | model / setting | BLEU | AE | note |", "|---|---|---|---|---|"]
    for fig, name, bleu_, ae, note in PAPER_OPERATING_POINTS:
        lines.append(f"| {fig} | {name} | {bleu_:.2f} | {_fmt(ae, 2)} | {note} |")
    return "\n".join(lines + [""])


def _fmt(value: Optional[float], digits: int) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def curves(run: RunDir, subset: str, cost: str) -> Dict[str, List[Tuple[float, float]]]:
    """Named (cost, BLEU) series for one subset: baselines (N, BLEU), each model's fixed exits,
    each adaptive method × model (logs and threshold_search points). cost: "ae" or "flops"."""
    series: Dict[str, List[Tuple[float, float]]] = {}
    for m in run.measurements:
        if m.subset != subset or m.role == "search-dominated":
            continue
        x = m.flops if cost == "flops" else m.ae
        fixed = strategy_of(m.setting) in ("fixed", "full")
        if cost == "ae" and m.model.startswith("baseline-") and m.setting == "full":
            x = float(m.model.split("-")[1])
        if x is None or (isinstance(x, float) and math.isnan(x)):
            continue
        if m.model.startswith("baseline-"):
            name = "baselines (N blocks)"
        elif fixed:
            name = f"{m.model}: fixed exits"
        else:
            label = method_label(m.model, m.setting, run.models.get(m.model)) or m.setting
            name = f"{m.model}: {label}"
        series.setdefault(name, []).append((x, m.bleu))
    return {k: sorted(set(v)) for k, v in series.items()}


def plot_bleu_vs_cost(run: RunDir, subset: str, cost: str, path: str) -> bool:
    series = curves(run, subset, cost)
    if not series:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in sorted(series.items()):
        style = "s--" if "fixed" in name or "baseline" in name else "o-"
        ax.plot([p[0] / (1e6 if cost == "flops" else 1) for p in pts], [p[1] for p in pts], style, label=name, ms=4)
    ax.set_xlabel("average exit (AE)" if cost == "ae" else "decoder MFLOPs per token (Appendix B)")
    ax.set_ylabel(f"BLEU ({subset})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_exit_histograms(run: RunDir, model: str, subset: str, path: str, limit: int = 8) -> bool:
    """Share of tokens per exit for up to ``limit`` adaptive settings of one model and subset."""
    hists = [(m.setting, m.exit_hist) for m in run.measurements
             if m.model == model and m.subset == subset and m.role in ("log", "front", "front-test")
             and sum(m.exit_hist) > 0 and strategy_of(m.setting) not in ("fixed", "full")][:limit]
    if not hists:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(hists)
    for i, (setting, hist) in enumerate(hists):
        total = sum(hist)
        ax.bar([n + 1 + (i - len(hists) / 2 + 0.5) * width for n in range(len(hist))],
               [c / total for c in hist], width=width, label=setting)
    ax.set_xlabel("exit block")
    ax.set_ylabel("share of output tokens")
    ax.set_title(f"{model}, {subset}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_plots(run: RunDir, plots_dir: str) -> List[str]:
    os.makedirs(plots_dir, exist_ok=True)
    written = []
    subsets = sorted({m.subset for m in run.measurements})
    for subset in subsets:
        for cost in ("ae", "flops"):
            path = os.path.join(plots_dir, f"bleu_vs_{cost}_{subset}.png")
            if plot_bleu_vs_cost(run, subset, cost, path):
                written.append(path)
    for model in sorted({m.model for m in run.measurements}):
        for subset in subsets:
            path = os.path.join(plots_dir, f"exit_hist_{model}_{subset}.png")
            if plot_exit_histograms(run, model, subset, path):
                written.append(path)
    return written


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def render(run: RunDir, plots: Sequence[str], out_dir: str) -> str:
    parts = [f"# Results: `{run.root}`", "",
             "Generated by `python -m fairseq_dat.cli.make_tables`. Each cell: ours / the paper's (IWSLT14 "
             "De-En, Elbayad et al. 2020, Table 1 and Appendix Tables 2-3). `not run`: no log for that cell; "
             "`–`: no number in the paper.", "",
             render_table("Table 1: aligned vs mixed training (valid BLEU)", run, TABLE1_ROWS, "valid",
                          PAPER_TABLE1, "")]
    for subset in ("valid", "test"):
        parts.append(render_table(f"Appendix Table 2 ({subset}): loss weights ω_n", run, TABLE2_ROWS, subset,
                                  PAPER_TABLE2[subset], "ω_n"))
    for subset in ("valid", "test"):
        parts.append(render_table(f"Appendix Table 3 ({subset}): gradient scaling γ", run, TABLE3_ROWS, subset,
                                  PAPER_TABLE3[subset], "γ"))
    parts.append(render_operating_points(run))
    if run.incomplete:
        parts += ["Logs without a BLEU line (incomplete or failed runs, not counted):", ""]
        parts += [f"- `{p}`" for p in run.incomplete] + [""]
    if plots:
        parts += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.relpath(p, out_dir)})" for p in plots]
    return "\n".join(parts) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fairseq_dat.cli.make_tables",
                                description="Markdown tables (paper Table 1, Appendix Tables 2-3, Figures 3/5 "
                                            "operating points) and plots from RUN_DIR/<model>/generate-"
                                            "<subset>-<setting>.log files and threshold_search JSONs.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="directory with one subdirectory per model (see --help "
                                                      "of the module docstring for the names)")
    p.add_argument("--out", required=True, help="markdown file to write")
    p.add_argument("--plots-dir", help="directory for the PNGs (default: no plots)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = build_parser().parse_args(argv)
    quiet_root_logger()
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise ConfigError(f"--out: directory {out_dir} does not exist")
    run = load_run_dir(args.run_dir)
    plots = write_plots(run, args.plots_dir) if args.plots_dir else []
    text = render(run, plots, out_dir)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out} ({len(run.measurements)} measurements, {len(plots)} plots)")
    return text


if __name__ == "__main__":
    run_main(main)
