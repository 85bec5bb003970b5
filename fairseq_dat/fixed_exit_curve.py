"""Does an adaptive rule beat fixed exits? (Elbayad et al., ICLR 2020, §4.2 and Fig. 3.)

The paper judges an exit rule by its BLEU-vs-AE curve against the anytime decoder at fixed exits:
decoding every token at block k gives the points (AE = k, BLEU_k), and mixing two neighbouring fixed
exits in the right proportion reaches any AE between them, so the fixed-exit curve is the
piecewise-linear interpolation between integer exits (Fig. 3's dashed "aligned" line). An adaptive
setting *beats fixed exits* at its AE when its BLEU lies above that line.

``gains_over_fixed_exits`` pairs each point of a front with the fixed-exit BLEU at the same AE.
"""
from bisect import bisect_right
from typing import Dict, List, Optional, Sequence, Tuple


def fixed_exit_bleu_at(fixed: Sequence[Tuple[float, float]], ae: float) -> Optional[float]:
    """BLEU of the fixed-exit curve at average exit ``ae``: the points (exit k, BLEU_k) joined by straight
    lines; None outside [first exit, last exit] (the curve is not extrapolated)."""
    points = sorted(fixed)
    if not points or ae < points[0][0] - 1e-9 or ae > points[-1][0] + 1e-9:
        return None
    xs = [x for x, _ in points]
    i = bisect_right(xs, ae)
    if i == 0:
        return points[0][1]
    if i >= len(points):
        return points[-1][1]
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    if x1 == x0:
        return max(y0, y1)
    return y0 + (y1 - y0) * (ae - x0) / (x1 - x0)


def gains_over_fixed_exits(front: Sequence[Dict], fixed: Sequence[Tuple[float, float]]) -> List[Dict]:
    """For each point {"ae", "bleu", …} of ``front``: the fixed-exit BLEU at its AE and the gain
    (its BLEU minus that; positive = the adaptive rule beats fixed exits there)."""
    rows = []
    for point in front:
        reference = fixed_exit_bleu_at(fixed, point["ae"])
        gain = None if reference is None else point["bleu"] - reference
        rows.append({**point, "fixed_bleu": reference, "gain": gain})
    return rows


def best_gain_below(rows: Sequence[Dict], max_ae: float) -> Optional[Dict]:
    """The row with the largest gain among those with AE < ``max_ae`` (the paper's claim is about AE < 2)."""
    eligible = [r for r in rows if r.get("gain") is not None and r["ae"] < max_ae]
    return max(eligible, key=lambda r: r["gain"]) if eligible else None
