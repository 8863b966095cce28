"""Value checks of a betas file: NaN/inf and scale, on a bounded sample of rows or on all.

mindhier expects betas z-scored per voxel and session (SPEC §1.1: MindEye2's ``fp32_renorm``
files; ``prepare-nsd`` and the synthetic world write them so), so every voxel's std over trials
is ≈ 1. NSD's volume betas are int16 = percent signal change × 300 (SPEC §1.2): a file that
skipped the division and the z-scoring has voxel stds in the hundreds, and nothing else in the
pipeline notices — training runs, on inputs 300× too large. So the scale is checked here, by
``data-info`` and when training data is loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mindhier.data.readers import BetasFile, DataError

SAMPLE_ROWS = 500  # rows data-info reads by default: ~30 MB of a real subject, about a second
MIN_SCALE_ROWS = 10  # a std over fewer rows says too little to refuse a file on
# Bounds on the median per-voxel std (the median, so a few dead or noisy voxels do not decide).
# z-scored: ≈ 1. Undivided percent signal change of single-trial betas: a few (NSD voxels
# ~1–10 %), still usable. NSD's int16 (PSC × 300): hundreds to thousands. Dividing by 300
# twice, or z-scored values scaled down the same way: ≈ 0.003–0.03.
MAX_VOXEL_STD = 30.0
MIN_VOXEL_STD = 0.05
READ_CHUNK = 750  # one NSD session per read: bounded memory on a 2 GB file


def sample_rows(num_rows: int, size: int | None = None) -> np.ndarray:
    """At most ``size`` (default :data:`SAMPLE_ROWS`) row numbers evenly spaced over
    0..num_rows−1, first and last included: deterministic, and every session is represented."""
    size = SAMPLE_ROWS if size is None else int(size)
    if num_rows <= 0 or size <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, num_rows - 1, min(size, num_rows)).round().astype(np.int64))


class ValueStats:
    """Running per-voxel sums over chunks of rows (float64: exact enough for z-scored data)."""

    def __init__(self):
        self.n, self.sum, self.sum_sq = 0, 0.0, 0.0
        self.lo, self.hi, self.whole = np.inf, -np.inf, True

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        if not x.size:
            return
        self.n += len(x)
        self.sum, self.sum_sq = self.sum + x.sum(axis=0), self.sum_sq + (x * x).sum(axis=0)
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        self.whole = self.whole and bool(np.all(x == np.round(x)))

    def summary(self) -> dict:
        n = max(self.n, 1)
        mean_v = np.atleast_1d(self.sum / n)
        var_v = np.maximum(np.atleast_1d(self.sum_sq / n) - mean_v ** 2, 0.0)
        mean = float(mean_v.mean())
        std = float(np.sqrt(max(float((var_v + mean_v ** 2).mean()) - mean ** 2, 0.0)))
        return {"rows_read": self.n, "mean": mean, "std": std, "voxel_std": float(np.median(np.sqrt(var_v))),
                "min": self.lo, "max": self.hi, "whole_numbers": self.whole}


def scan_values(betas: BetasFile, rows: np.ndarray | None = None) -> dict:
    """Read ``rows`` (default: all) in chunks — :meth:`BetasFile.read` raises on NaN/inf — and
    summarise them: overall mean/std, median per-voxel std, range, whether all are whole."""
    rows = np.arange(betas.num_trials) if rows is None else np.asarray(rows, dtype=np.int64)
    stats = ValueStats()
    for start in range(0, len(rows), READ_CHUNK):
        stats.add(betas.read(rows[start:start + READ_CHUNK]))
    return {**stats.summary(), "rows": betas.num_trials, "dtype": str(betas.dtype)}


def scale_problem(summary: dict, path: Path) -> str | None:
    """Why these values cannot be z-scored betas, or None when their scale is plausible."""
    n, scale = summary["rows_read"], summary["voxel_std"]
    if n < MIN_SCALE_ROWS or MIN_VOXEL_STD <= scale <= MAX_VOXEL_STD:
        return None
    whole = ", every one a whole number" if summary["whole_numbers"] else ""
    seen = (f"the median per-voxel std over {n} rows is {scale:.3g} (values {summary['min']:.4g}.."
            f"{summary['max']:.4g}{whole}, stored as {summary.get('dtype', 'float')})")
    cause = ("this looks like NSD's raw int16 betas (percent signal change × 300), never divided by 300 "
             "nor z-scored" if scale > MAX_VOXEL_STD else
             "far below z-scored data: the betas were scaled down (divided by 300 twice?)")
    return (f"{path}: betas are not z-scored: {seen}; z-scored betas (MindEye2's fp32_renorm files, what "
            f"mindhier expects) have std ≈ 1 — {cause}. Fix: re-create the file from raw NSD with `mindhier "
            "prepare-nsd --force` (divides by 300 and z-scores each voxel per session), or z-score each "
            "voxel per session yourself into a new file.")


def check_scale(values: np.ndarray, betas: BetasFile) -> None:
    """Refuse training data whose scale is not that of z-scored betas (see :func:`scale_problem`)."""
    stats = ValueStats()
    stats.add(values)
    problem = scale_problem({**stats.summary(), "dtype": str(betas.dtype)}, betas.path)
    if problem:
        raise DataError(problem)
