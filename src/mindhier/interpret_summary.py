"""Across runs of ``mindhier interpret``: does the hierarchy hold in every subject, by more than
the seed spread, and more than in the control?

    mindhier interpret-summary runs/interpret/*/interpret --out experiments/interpret

For each run (one encoder: subject, supervision, seed) the *margin* is the mean best-block index
of the highest areas minus that of the earliest (positive: deeper blocks predict higher areas).
Runs are grouped by supervision (``hierarchical`` is MindHier's encoder; ``final-only``, paper
Table 2's middle row, is the control: the same encoder aligned only at its output); the seed
spread is the standard deviation of the margin over the runs of one subject and supervision.
Writes SUMMARY.md, summary.json and best_block_by_area.png into OUT.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from mindhier.errors import MindhierError


class SummaryError(MindhierError, ValueError):
    pass


def run_row(summary: dict, folder: str) -> dict:
    """One run's line: who it is and how its best block moves along the areas."""
    row = {"folder": folder, "subject": summary["subject"], "supervision": summary["encoder_supervision"],
           "seed": summary.get("encoder_seed"), "targets": summary["targets"], "features": summary["features"]}
    for model, res in summary["models"].items():
        steps = res["by_rank"]
        row[model] = {"by_rank": [s["best_block_index"] for s in steps], "areas": [s["areas"] for s in steps],
                      "margin": steps[-1]["best_block_index"]["mean"] - steps[0]["best_block_index"]["mean"],
                      "rises": res["best_block_rises"], "spearman": res["spearman_area_vs_best_block"]}
    return row


def load_rows(folders) -> list[dict]:
    rows = []
    for folder in folders:
        path = Path(folder) / "interpret.json"
        if not path.is_file():
            raise SummaryError(f"{path} not found: pass the --out folders of `mindhier interpret` runs")
        rows.append(run_row(json.loads(path.read_text()), str(folder)))
    settings = {(r["targets"], r["features"]) for r in rows}
    if len(settings) > 1:
        raise SummaryError(f"the runs use different --targets/--features ({sorted(settings)}); summarise like with like")
    return rows


def group_stats(rows: list[dict]) -> dict:
    """Per supervision: each subject's margins over seeds (mean, sd), and over subjects."""
    out = {}
    for sup in sorted({r["supervision"] for r in rows}):
        mine = [r for r in rows if r["supervision"] == sup]
        subjects = {}
        for s in sorted({r["subject"] for r in mine}):
            margins = [r["encoder"]["margin"] for r in mine if r["subject"] == s]
            subjects[s] = {"margins": margins, "mean": float(np.mean(margins)),
                           "sd": float(np.std(margins, ddof=1)) if len(margins) > 1 else math.nan,
                           "rises": [r["encoder"]["rises"] for r in mine if r["subject"] == s]}
        means = [v["mean"] for v in subjects.values()]
        out[sup] = {"subjects": subjects, "mean_over_subjects": float(np.mean(means)),
                    "positive_in": sum(m > 0 for m in means), "of": len(means)}
    return out


def markdown(rows: list[dict], stats: dict) -> str:
    lines = ["# Which encoder block predicts which area, over subjects, seeds and supervision", "",
             f"targets `{rows[0]['targets']}`, features `{rows[0]['features']}`. Margin = mean best-block index of "
             "the highest areas − that of the earliest (the index counts e_1..e_M; positive = deeper blocks "
             "predict higher areas).", "",
             "| subject | supervision | seed | best-block index per area (early → high) | margin | rises | Spearman | vision model's margin |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["supervision"], r["subject"], r["seed"] or 0)):
        enc = r["encoder"]
        idx = " → ".join(f"{b['mean']:.2f}" for b in enc["by_rank"])
        vis = f"{r['vision']['margin']:+.2f}" if "vision" in r else "–"
        lines.append(f"| {r['subject']} | {r['supervision']} | {r['seed']} | {idx} | {enc['margin']:+.2f} | "
                     f"{'yes' if enc['rises'] else 'no'} | {enc['spearman']:.3f} | {vis} |")
    lines += ["", "| supervision | subject | margin, mean over seeds | sd over seeds | seeds |", "|---|---|---|---|---|"]
    for sup, st in stats.items():
        for s, v in st["subjects"].items():
            sd = "–" if math.isnan(v["sd"]) else f"{v['sd']:.2f}"
            lines.append(f"| {sup} | {s} | {v['mean']:+.2f} | {sd} | {len(v['margins'])} |")
        lines.append(f"| {sup} | mean of subjects | {st['mean_over_subjects']:+.2f} | | positive in "
                     f"{st['positive_in']} of {st['of']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    subjects = sorted({r["subject"] for r in rows})
    colours = dict(zip(subjects, plt.get_cmap("tab10").colors))
    for r in rows:
        idx = r["encoder"]["by_rank"]
        x = np.arange(len(idx)) + (0.04 if r["supervision"] != "hierarchical" else 0)
        y = [b["mean"] for b in idx]
        err = [[b["mean"] - b["low"] for b in idx], [b["high"] - b["mean"] for b in idx]]
        ax.errorbar(x, y, yerr=err, color=colours[r["subject"]], capsize=2, alpha=0.8,
                    linestyle="-" if r["supervision"] == "hierarchical" else "--", marker="o", markersize=3)
    ax.set_xticks(range(len(rows[0]["encoder"]["areas"])), ["/".join(a) for a in rows[0]["encoder"]["areas"]])
    ax.set_ylabel("mean best-block index (1 = e_1)")
    handles = [plt.Line2D([], [], color=colours[s], label=f"subject {s}") for s in subjects]
    handles += [plt.Line2D([], [], color="k", linestyle=ls, label=lab)
                for ls, lab in (("-", "hierarchical"), ("--", "final-only (control)"))]
    ax.legend(handles=handles, fontsize=7)
    ax.set_title("best encoder block per area (95 % intervals over voxels)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="`mindhier interpret --out` folders")
    p.add_argument("--out", required=True, help="folder for SUMMARY.md, summary.json, best_block_by_area.png")


def run(args: argparse.Namespace) -> int:
    rows = load_rows(args.runs)
    stats = group_stats(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"runs": rows, "by_supervision": stats}, indent=1))
    (out / "SUMMARY.md").write_text(markdown(rows, stats))
    plot(rows, out / "best_block_by_area.png")
    print(markdown(rows, stats))
    return 0
