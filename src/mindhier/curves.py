"""Training curves of a run folder: OUT/log.jsonl (one record per optimiser step, as every
`mindhier train-*` command writes it) drawn into OUT/curves.png.

    mindhier curves runs/encoder                  # -> runs/encoder/curves.png
    mindhier curves runs/generator --out gen.png

Panels, each only when the log has its fields: the loss (``loss`` and every ``*_loss``), the
learning rate, the gradient norm, the other per-step training numbers (token accuracy, loss
parts, codebook use, ...), and held-out metrics where the loop measures them during training
(train-encoder's per-epoch test scores in OUT/metrics.jsonl). The training commands redraw the
picture at every checkpoint, so a run in progress can be watched by opening the PNG.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from mindhier.errors import MindhierError

LOG_NAME, HELD_OUT_NAME, PNG_NAME = "log.jsonl", "metrics.jsonl", "curves.png"
# Bookkeeping fields of a log record, not curves.
NOT_CURVES = ("step", "epoch", "skipped", "earlier", "n_test")
SMOOTH_FROM = 50   # points; longer noisy curves also get a moving average drawn over them


class CurvesError(MindhierError):
    """A run folder whose log cannot be drawn."""


@dataclass
class Panel:
    title: str
    lines: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    log_y: bool = False


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; a half-written last line (a run killed mid-write) is
    ignored, any other unreadable line is an error naming it."""
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise CurvesError(f"{path}, line {number}: not JSON ({err}); the log is damaged") from None
    return records


def logged_seconds(run_dir: str | Path) -> float | None:
    """The optimiser steps' own seconds summed over a run's log.jsonl (sample grids and
    checkpoint writes excluded); None where the run has no log with step times."""
    log = Path(run_dir) / "log.jsonl"
    times = [r["seconds"] for r in read_jsonl(log) if "seconds" in r] if log.is_file() else []
    return round(sum(times), 1) if times else None


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The record's numbers, nested dicts flattened as ``outer.inner`` (lists are skipped)."""
    out = {}
    for key, value in record.items():
        name = prefix + key
        if isinstance(value, dict):
            out.update(scalars(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in NOT_CURVES \
                and not key.startswith("seconds"):
            out[name] = float(value)
    return out


def series(records: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """name -> (steps, values), non-finite values (skipped steps) left out."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for record in records:
        if "step" not in record:
            continue
        for name, value in scalars(record).items():
            if math.isfinite(value):
                steps, values = out.setdefault(name, ([], []))
                steps.append(record["step"])
                values.append(value)
    return out


def panels(run_dir: str | Path) -> list[Panel]:
    """The panels of a run folder's curves (see the module doc), in drawing order."""
    run_dir = Path(run_dir)
    log = run_dir / LOG_NAME
    if not log.is_file():
        raise CurvesError(f"{log}: not found; give the --out folder of a `mindhier train-*` run "
                          "(every training command writes its per-step log there)")
    train = series(read_jsonl(log))
    if not train:
        raise CurvesError(f"{log}: no records with a step yet; wait for the run's first logged step")
    loss = Panel("loss", {k: v for k, v in train.items() if k == "loss" or k.endswith("_loss")})
    lr = Panel("learning rate", {k: v for k, v in train.items() if k == "lr"})
    norm = Panel("gradient norm", {k: v for k, v in train.items() if k == "grad_norm"})
    drawn = set(loss.lines) | set(lr.lines) | set(norm.lines)
    other = Panel("training metrics", {k: v for k, v in train.items() if k not in drawn})
    held = Panel("held-out")
    if (run_dir / HELD_OUT_NAME).is_file():
        records = read_jsonl(run_dir / HELD_OUT_NAME)
        held.lines = series([{"step": r["step"], **r["test"]} for r in records if "step" in r and "test" in r])
    for panel in (loss, norm):  # spikes and long decays read on a log axis, small changes do not
        panel.log_y = _spread(panel) > 20
    return [p for p in (loss, lr, norm, other, held) if p.lines]


def _spread(panel: Panel) -> float:
    """max / min of a panel's values; 1 when any is not positive (no log axis then)."""
    values = [v for _, y in panel.lines.values() for v in y]
    return max(values) / min(values) if values and min(values) > 0 else 1.0


def moving_average(values: list[float], width: int) -> list[float]:
    """Trailing mean over ``width`` points (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - width] if i >= width else 0.0)
        out.append(total / min(i + 1, width))
    return out


def write_curves(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's curves into ``out`` (default RUN_DIR/curves.png); returns the path. The
    panel titles are also stored in the PNG's "panels" text field."""
    # The Agg canvas on a bare Figure, not pyplot: files only (a training node has no display),
    # and no global backend switched under whoever called us.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    drawn = panels(run_dir)
    out = Path(out) if out is not None else run_dir / PNG_NAME
    fig = Figure(figsize=(8, 2.6 * len(drawn)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(drawn), 1, sharex=True, squeeze=False)
    for ax, panel in zip(axes[:, 0], drawn):
        for name, (x, y) in panel.lines.items():
            smooth = len(y) >= SMOOTH_FROM and panel.title in ("loss", "training metrics")
            line, = ax.plot(x, y, lw=1, alpha=0.35 if smooth else 1.0, label=None if smooth else name,
                            marker="o" if panel.title == "held-out" else None, ms=3)
            if smooth:  # per-step values are noisy: the trend over them is what one reads
                ax.plot(x, moving_average(y, max(2, len(y) // 25)), lw=1.5, color=line.get_color(), label=name)
        ax.set_title(panel.title, fontsize=10, loc="left")
        if panel.log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len(panel.lines) > 1 or panel.title in ("training metrics", "held-out"):
            ax.legend(fontsize=7, ncol=min(4, len(panel.lines)), loc="best")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(str(run_dir), fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")  # a viewer never sees a half-written picture
    fig.savefig(tmp, dpi=90, metadata={"panels": json.dumps([p.title for p in drawn])})
    tmp.replace(out)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run's --out folder (holds log.jsonl)")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/curves.png)")


def run(args: argparse.Namespace) -> int:
    path = write_curves(args.run_dir, args.out)
    print(f"wrote {path} ({', '.join(p.title for p in panels(args.run_dir))})")
    return 0
