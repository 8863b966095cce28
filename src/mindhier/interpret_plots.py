"""Pictures of ``mindhier interpret``: a block × area heat map and the best-block map."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(summary: dict, path: Path) -> None:
    """Mean held-out r of every block (rows) in every area (columns), one panel per model."""
    plt = _plt()
    models = summary["models"]
    areas = summary["area_names"]
    fig, axes = plt.subplots(1, len(models), figsize=(1.2 + 1.3 * len(areas) * len(models), 3.6), squeeze=False)
    top = max(max(res["areas"][a]["mean_r"][b]["mean"] for a in areas for b in res["blocks"])
              for res in models.values())
    for ax, (name, res) in zip(axes[0], models.items()):
        grid = np.array([[res["areas"][a]["mean_r"][b]["mean"] for a in areas] for b in res["blocks"]])
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(top, 1e-3), aspect="auto")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                best = grid[:, j].argmax() == i
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=8,
                        color="white" if grid[i, j] < 0.6 * top else "black", fontweight="bold" if best else None)
        ax.set_xticks(range(len(areas)), areas)
        ax.set_yticks(range(len(res["blocks"])), res["blocks"])
        ax.set_title(f"{name}: mean held-out r", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle(f"subject {summary['subject']}, targets {summary['targets']} (bold: the block best for the area)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def best_block_map(summary: dict, arrays: dict, path: Path) -> None:
    """Every voxel at its layout position, coloured by its best block (grey: no block predicts it)."""
    plt = _plt()
    xy = arrays["layout_xy"]
    models = summary["models"]
    fig, axes = plt.subplots(len(models), 1, figsize=(9, 3.3 * len(models)), squeeze=False)
    for ax, (name, res) in zip(axes[:, 0], models.items()):
        best = arrays[f"{name}/best_block"]
        blocks = res["ranked_blocks"]
        colours = plt.get_cmap("plasma")(np.linspace(0.05, 0.9, len(blocks)))
        none = best == 0
        ax.scatter(xy[none, 0], xy[none, 1], s=6, c="lightgrey", label="none above threshold")
        for i, block in enumerate(blocks):
            sel = best == i + 1
            ax.scatter(xy[sel, 0], xy[sel, 1], s=6, color=colours[i], label=block)
        for k, area in enumerate(summary["area_names"]):
            ax.text(k * 1.15 + 0.5, 1.04, area, ha="center", fontsize=9)
        ax.set_xlim(-0.05, len(summary["area_names"]) * 1.15 - 0.1)
        ax.set_ylim(-0.03, 1.1)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(f"{name}: best block per voxel", fontsize=9)
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=2, frameon=False)
    fig.text(0.01, 0.005, "early, mid: voxels at their receptive field's centre in the visual field; "
             "high: grouped by preferred category", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
