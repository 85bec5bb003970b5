"""The exit summary line of a decoding run: written once, parsed once.

``fairseq-generate --task adaptive_translation`` prints after fairseq's BLEU line, per generator::

    Adaptive exits (N=6): AE=1.8412 tokens=13991 exits=[9021,2313,...] compute_AE=1.9001 rows=70112

- ``N``: the decoder's blocks; ``AE``: the paper's average exit (§4, mean 1-based exit block over the
  tokens of the returned hypotheses, EOS included); ``tokens`` and ``exits=[…]``: those tokens and
  their histogram over exits 1..N;
- ``compute_AE`` and ``rows``: the mean exit over every beam row decoded at every step (finished or
  not), which is what decoding time follows, and how many row-steps that was.

:meth:`ExitSummary.line` writes it (the task's summary and threshold_search's JSON);
:func:`parse_exit_summary` reads it back (make_tables, exit_analysis, tests).
"""
import math
import re
from dataclasses import dataclass
from typing import Optional, Tuple

PREFIX = "Adaptive exits"
_LINE = re.compile(rf"{PREFIX} \(N=(?P<n>\d+)\): AE=(?P<ae>\S+) tokens=(?P<tokens>\d+) "
                   r"exits=\[(?P<hist>[0-9,]*)\] compute_AE=(?P<cae>\S+) rows=(?P<rows>\d+)")


@dataclass(frozen=True)
class ExitSummary:
    num_exits: int
    average_exit: float  # AE over the returned hypotheses' tokens (nan: no tokens)
    exit_hist: Tuple[int, ...]  # tokens per exit 1..N
    compute_average_exit: float  # over every beam row at every step
    rows: int

    @property
    def tokens(self) -> int:
        return sum(self.exit_hist)

    @classmethod
    def of_stats(cls, stats) -> "ExitSummary":
        """From the generator's ``ExitStats`` (``token_hist``/``row_hist`` over exits 1..N)."""
        return cls(num_exits=stats.num_exits, average_exit=stats.average_exit,
                   exit_hist=tuple(int(c) for c in stats.token_hist),
                   compute_average_exit=stats.compute_average_exit, rows=int(stats.row_hist.sum()))

    def line(self) -> str:
        hist = ",".join(str(c) for c in self.exit_hist)
        return (f"{PREFIX} (N={self.num_exits}): AE={self.average_exit:.4f} tokens={self.tokens} exits=[{hist}] "
                f"compute_AE={self.compute_average_exit:.4f} rows={self.rows}")


def parse_exit_summary(text: str) -> Optional[ExitSummary]:
    """The first summary in ``text`` (a log line or a whole log), or None."""
    m = _LINE.search(text)
    if m is None:
        return None
    return ExitSummary(num_exits=int(m.group("n")), average_exit=_float(m.group("ae")),
                       exit_hist=tuple(int(c) for c in m.group("hist").split(",") if c),
                       compute_average_exit=_float(m.group("cae")), rows=int(m.group("rows")))


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan
