"""Which encoder block predicts which visual area (paper appendix D, Fig. S1), measured.

    mindhier interpret --data worlds/demo --subject 1 --encoder checkpoints/demo/encoder \\
        --vision checkpoints/foundation/vision --out runs/interpret/s1

The paper fits L2-regularised linear models from each block of the fMRI encoder to the voxels
and shows that early blocks predict early visual cortex and deep blocks higher areas. On NSD
that is a picture; on the synthetic world every voxel's true area is known, so this command
says whether it holds and by how much.

**What is fitted.** For each block — the encoder's levels e_1..e_M and its final projected
output, and, as a reference, the vision model's layers g_1..g_M it was aligned to — a ridge
regression from the block's features on a test image to every voxel's response to it,
cross-validated over the test images (``--folds``, images never in the fold they are scored on);
the penalty is chosen per voxel by exact leave-one-out inside the training folds (grid relative
to the mean squared singular value, as the world report's ridge). Per voxel: the held-out
Pearson r of every block, and the best block (the argmax over e_1..e_M; ``final`` is a linear
map of e_M and is reported, not ranked).

**Features** (``--features``): ``tokens`` = every token of the block, flattened (T·D numbers;
fitted in kernel form, the same as ridge on all principal components of the training fold: no
reduction is chosen); ``pooled`` = the mean over tokens (D numbers; loses where things are).

**Targets** (``--targets``): the encoder's features are computed *from fMRI*, so features and
targets must not share trial noise, or the block nearest the input wins everywhere by
reproducing the noise. ``held-out-repetition`` (default): the encoder reads the mean of two of an
image's three repetitions and the ridge predicts the third, each repetition in turn, r averaged
over the three. ``average`` is the paper's reading (both from the mean of all three
repetitions): offered to compare, and marked as sharing noise. The vision model's features come
from the image and are scored on the same targets.

**Per area**: mean r of each block (within each fold, averaged over folds) with a 95 % interval
over voxels, the share of voxels each block wins, and the mean best-block index over the
*predictable* voxels (best r above 1.96/√n_images: the fold-averaged r of unrelated variables
has a standard deviation of about 1/√n_images), with its interval; the hierarchy
holds when that index rises along the areas' order (early → mid → high), and the Spearman
correlation between area order and best block says by how much.

OUT gets interpret.json (every number; per-voxel arrays in voxels.npz), interpret.md,
heatmap.png (block × area mean r) and, on the world, best_block_map.png (the voxels laid out
like a flattened cortex; see :func:`mindhier.interpret_areas.world_layout`). On NSD there is no
flat map (it needs pycortex and the subject's surfaces); the per-area tables use the given
label volume.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from mindhier.errors import MindhierError
from mindhier.interpret_areas import Areas, nsd_areas, world_areas, world_layout
from mindhier.world.report import RELATIVE_ALPHAS, Ridge

TARGETS = ("held-out-repetition", "average")
FEATURES = ("tokens", "pooled")
FINAL = "final"


class InterpretError(MindhierError, ValueError):
    pass


# ---------------------------------------------------------------- features

def reduce_tokens(tokens: torch.Tensor, how: str) -> np.ndarray:
    """(B, T, D) → (B, T·D) (``tokens``) or (B, D) (``pooled``), float64."""
    if how == "pooled":
        return tokens.float().mean(dim=1).double().numpy()
    return tokens.float().flatten(1).double().numpy()


@torch.no_grad()
def encoder_blocks(encoder, voxels: torch.Tensor, how: str, batch: int = 100) -> dict[str, np.ndarray]:
    """{"e_1": …, "e_M": …, "final": …}: each block's features for voxels (N, V)."""
    parts: dict[str, list] = {}
    device = next(encoder.parameters()).device
    for chunk in voxels.split(batch):
        out = encoder(chunk.float().to(device))
        for m, e in enumerate(out.levels, start=1):
            parts.setdefault(f"e_{m}", []).append(reduce_tokens(e.cpu(), how))
        parts.setdefault(FINAL, []).append(reduce_tokens(out.image_final.cpu(), how))
    return {k: np.concatenate(v) for k, v in parts.items()}


@torch.no_grad()
def vision_blocks(vision, images01: torch.Tensor, layers, how: str, batch: int = 100) -> dict[str, np.ndarray]:
    """{"layer g": …}: the vision model's features of the stimuli at each layer g."""
    parts: dict[str, list] = {f"layer {g}": [] for g in layers}
    device = next(vision.parameters()).device
    for chunk in images01.split(batch):
        for g, v in zip(layers, vision.image_layer_features(chunk.float().to(device), list(layers))):
            parts[f"layer {g}"].append(reduce_tokens(v.cpu(), how))
    return {k: np.concatenate(v) for k, v in parts.items()}


# ---------------------------------------------------------------- cross-validated ridge

def make_folds(n: int, k: int, seed: int = 0) -> list[np.ndarray]:
    """k disjoint test folds covering 0..n−1 (a seeded permutation cut into k parts)."""
    if not 2 <= k <= n:
        raise InterpretError(f"--folds must be between 2 and the number of test images ({n}), got {k}")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(f) for f in np.array_split(order, k)]


def pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each column of a with the same column of b (0 where one is constant)."""
    ac, bc = a - a.mean(axis=0), b - b.mean(axis=0)
    den = np.sqrt((ac**2).sum(axis=0) * (bc**2).sum(axis=0))
    return np.where(den > 0, (ac * bc).sum(axis=0) / np.where(den > 0, den, 1), 0.0)


def cross_validated_predictions(x: np.ndarray, y: np.ndarray, folds, alphas=RELATIVE_ALPHAS) -> np.ndarray:
    """Held-out ridge predictions of every column of y (N, V) from x (N, F): each fold predicted
    by a model fitted on the others, the penalty chosen per column by exact leave-one-out error
    inside those."""
    pred = np.empty_like(y, dtype=np.float64)
    for test in folds:
        train = np.setdiff1d(np.arange(len(y)), test)
        ridge = Ridge(x[train])
        loo = ridge.loo_predictions(y[train], alphas)
        error = np.stack([((p - y[train]) ** 2).mean(axis=0) for p in loo.values()])  # (A, V)
        best = error.argmin(axis=0)
        held_out = np.stack(list(ridge.predictions(x[test], y[train], alphas).values()))  # (A, m, V)
        pred[test] = np.take_along_axis(held_out, best[None, None, :], axis=0)[0]
    return pred


def held_out_r(x: np.ndarray, y: np.ndarray, folds) -> np.ndarray:
    """Per column of y, the Pearson r of held-out predictions within each fold, averaged over
    folds (weighted by size). Within a fold, not over the concatenated folds: each fold's
    intercept is the other folds' mean, which moves against the fold's own mean, so r over the
    concatenation of unrelated features sits well below zero (≈ −0.1 at 4–5 folds)."""
    pred = cross_validated_predictions(x, y, folds)
    return sum(len(f) * pearson_columns(pred[f], y[f]) for f in folds) / sum(len(f) for f in folds)


def block_scores(features: list[dict[str, np.ndarray]], targets: list[np.ndarray], folds) -> dict[str, np.ndarray]:
    """Per block, the held-out r of every voxel (:func:`held_out_r`), averaged over the target
    splits: split j predicts ``targets[j]`` (N, V) from ``features[j]`` (a dict of blocks)."""
    names = list(features[0])
    return {name: np.mean([held_out_r(f[name], y, folds) for f, y in zip(features, targets)], axis=0)
            for name in names}


# ---------------------------------------------------------------- per area

def mean_interval(values: np.ndarray) -> dict:
    """Mean with a normal 95 % interval over the values (n < 2: no interval)."""
    n = len(values)
    if n == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    mean = float(np.mean(values))
    half = 1.96 * float(np.std(values, ddof=1)) / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": int(n)}


def best_blocks(scores: dict[str, np.ndarray], ranked: list[str], threshold: float) -> np.ndarray:
    """Per voxel the 1-based index of its best block among ``ranked``; 0 where no block predicts
    it above ``threshold``."""
    r = np.stack([scores[name] for name in ranked])
    best = r.argmax(axis=0) + 1
    return np.where(r.max(axis=0) > threshold, best, 0)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan
    return float(spearmanr(a, b).statistic)


def summarise_areas(scores: dict[str, np.ndarray], ranked: list[str], areas: Areas, n_images: int) -> dict:
    """What each block predicts in each area, and whether the best block rises with the area."""
    threshold = 1.96 / math.sqrt(n_images)
    best = best_blocks(scores, ranked, threshold)
    per_area = {}
    for k, name in enumerate(areas.names):
        idx = areas.members(k)
        won = best[idx][best[idx] > 0]
        per_area[name] = {
            "voxels": int(len(idx)), "predictable": int(len(won)),
            "mean_r": {b: mean_interval(scores[b][idx]) for b in scores},
            "wins": {b: float(np.mean(won == i + 1)) if len(won) else math.nan for i, b in enumerate(ranked)},
            "best_block_index": mean_interval(won.astype(np.float64)),
        }
    labelled = np.flatnonzero((areas.label >= 0) & (best > 0))
    ranks = np.asarray(areas.rank)[areas.label[labelled]]
    by_rank = [{"rank": int(r), "areas": [n for n, rr in zip(areas.names, areas.rank) if rr == r],
                "best_block_index": mean_interval(best[labelled][ranks == r].astype(np.float64))}
               for r in sorted(set(areas.rank))]
    means = [step["best_block_index"]["mean"] for step in by_rank]
    return {"threshold_r": threshold, "ranked_blocks": ranked, "areas": per_area, "by_rank": by_rank,
            "spearman_area_vs_best_block": spearman(ranks.astype(float), best[labelled].astype(float)),
            "best_block_rises": bool(len(means) > 1 and all(a < b for a, b in zip(means, means[1:]))),
            "best_block": best}


# ---------------------------------------------------------------- the command

def target_splits(voxels: np.ndarray, mode: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(encoder input (N, V), target (N, V))] for voxels (N, 3, V): see the module doc."""
    if mode == "average":
        mean = voxels.mean(axis=1)
        return [(mean, mean)]
    reps = voxels.shape[1]
    return [(voxels[:, [i for i in range(reps) if i != j]].mean(axis=1), voxels[:, j]) for j in range(reps)]


def interpret(data: Path, subject: int, encoder_path: Path, vision_path: Path | None, *, targets: str = TARGETS[0],
              features: str = FEATURES[0], folds: int = 5, seed: int = 0, vision_layers=None,
              rois: Path | None = None, nsdgeneral: Path | None = None, roi_kind: str | None = None,
              limit: int | None = None, show_progress: bool = True) -> dict:
    """Everything ``mindhier interpret`` measures, as a dict (per-voxel arrays under ``voxels``)."""
    from tqdm import tqdm

    from mindhier.data import load_test_set
    from mindhier.encoder import load_encoder

    test = load_test_set(data, subject, policy="repeats", limit=limit)
    voxels = test.voxels.numpy().astype(np.float64)
    encoder, meta = load_encoder(encoder_path, num_voxels=voxels.shape[-1], subject=subject)
    areas = (nsd_areas(rois, nsdgeneral, voxels.shape[-1], roi_kind) if rois is not None
             else world_areas(data, subject))
    if len(areas.label) != voxels.shape[-1]:
        raise InterpretError(f"{areas.source} labels {len(areas.label)} voxels, the betas have {voxels.shape[-1]}")
    splits = target_splits(voxels, targets)
    cv = make_folds(len(voxels), folds, seed)
    levels = [f"e_{m}" for m in range(1, encoder.cfg.num_levels + 1)]
    feature_sets = [encoder_blocks(encoder, torch.from_numpy(x).float(), features) for x, _ in splits]
    ys = [y for _, y in splits]
    result = {"data": str(data), "subject": subject, "encoder": str(encoder_path), "targets": targets,
              "features": features, "folds": folds, "seed": seed, "images": len(voxels),
              "areas_source": areas.source, "area_names": areas.names, "area_ranks": areas.rank,
              "encoder_supervision": meta.get("config", {}).get("supervision"),
              "encoder_layers": meta.get("train", {}).get("layers"), "encoder_seed": meta.get("train", {}).get("seed"),
              "models": {}}
    bar = tqdm(total=2 if vision_path else 1, desc="ridge per block", disable=not show_progress, dynamic_ncols=True)
    scores = block_scores(feature_sets, ys, cv)
    result["models"]["encoder"] = {"blocks": list(scores), **summarise_areas(scores, levels, areas, len(voxels)),
                                   "scores": scores}
    bar.update()
    if vision_path is not None:
        from mindhier.vision import load_vision

        layers = list(vision_layers or meta["train"]["layers"])
        vision = load_vision(vision_path).freeze()
        vis = vision_blocks(vision, test.stimuli, layers, features)
        vscores = block_scores([vis] * len(ys), ys, cv)
        result["models"]["vision"] = {"blocks": list(vscores), "path": str(vision_path),
                                      **summarise_areas(vscores, list(vscores), areas, len(voxels)), "scores": vscores}
        bar.update()
    bar.close()
    if rois is None:
        result["layout"] = world_layout(Path(data), subject, areas)
    result["area_label"] = areas.label
    return result


# ---------------------------------------------------------------- outputs

def split_arrays(result: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """(the JSON-able part, the per-voxel arrays for voxels.npz)."""
    arrays = {"area_label": result["area_label"]}
    summary = {k: v for k, v in result.items() if k not in ("models", "area_label", "layout")}
    summary["models"] = {}
    for model, res in result["models"].items():
        summary["models"][model] = {k: v for k, v in res.items() if k not in ("scores", "best_block")}
        arrays[f"{model}/best_block"] = res["best_block"]
        for block, r in res["scores"].items():
            arrays[f"{model}/r/{block}"] = r.astype(np.float32)
    if result.get("layout") is not None:
        arrays["layout_xy"], summary["layout"] = result["layout"]
    return summary, arrays


def fmt(iv: dict, digits: int = 3) -> str:
    if iv["n"] == 0 or math.isnan(iv["mean"]):
        return "–"
    if math.isnan(iv["low"]):
        return f"{iv['mean']:.{digits}f}"
    return f"{iv['mean']:.{digits}f} [{iv['low']:.{digits}f}, {iv['high']:.{digits}f}]"


def markdown(summary: dict) -> str:
    lines = [f"# Which block predicts which area: subject {summary['subject']}", "",
             f"- encoder `{summary['encoder']}` (supervision: {summary['encoder_supervision']}, aligned to vision "
             f"layers {summary['encoder_layers']}); data `{summary['data']}`, {summary['images']} test images",
             f"- targets: `{summary['targets']}`"
             + (" (the encoder reads two repetitions, the ridge predicts the third)" if summary["targets"] == TARGETS[0]
                else " (features and targets share trial noise: the paper's reading)"),
             f"- features: `{summary['features']}`; {summary['folds']}-fold cross-validation over test images "
             f"(seed {summary['seed']}), penalty per voxel by leave-one-out inside the training folds",
             f"- areas: {summary['areas_source']}", ""]
    for model, res in summary["models"].items():
        lines += [f"## {model}: mean held-out r per area (95 % interval over voxels)", "",
                  "| block | " + " | ".join(summary["area_names"]) + " |",
                  "|---" * (len(summary["area_names"]) + 1) + "|"]
        for block in res["blocks"]:
            lines.append(f"| {block} | " + " | ".join(fmt(res["areas"][a]["mean_r"][block])
                                                       for a in summary["area_names"]) + " |")
        lines += ["", f"Best block among {', '.join(res['ranked_blocks'])} (voxels whose best r exceeds "
                  f"{res['threshold_r']:.3f}):", "",
                  "| area | voxels | predictable | " + " | ".join(f"wins {b}" for b in res["ranked_blocks"])
                  + " | mean best-block index |", "|---" * (len(res["ranked_blocks"]) + 4) + "|"]
        for a in summary["area_names"]:
            s = res["areas"][a]
            lines.append(f"| {a} | {s['voxels']} | {s['predictable']} | "
                         + " | ".join("–" if math.isnan(w) else f"{100 * w:.0f} %" for w in s["wins"].values())
                         + f" | {fmt(s['best_block_index'], 2)} |")
        rises = "rises" if res["best_block_rises"] else "does not rise"
        lines += ["", f"The mean best-block index {rises} along the areas' order "
                  f"({' → '.join(fmt(step['best_block_index'], 2) for step in res['by_rank'])}); "
                  f"Spearman r between area order and best block: {res['spearman_area_vs_best_block']:.3f}.", ""]
    if summary.get("layout"):
        lines += ["Layout of best_block_map.png: " + summary["layout"] + ".", ""]
    return "\n".join(lines)


def write_outputs(result: dict, out: Path) -> dict:
    from mindhier.interpret_plots import best_block_map, heatmap

    out.mkdir(parents=True, exist_ok=True)
    summary, arrays = split_arrays(result)
    np.savez_compressed(out / "voxels.npz", **arrays)
    (out / "interpret.json").write_text(json.dumps(summary, indent=1))
    (out / "interpret.md").write_text(markdown(summary))
    heatmap(summary, out / "heatmap.png")
    if "layout_xy" in arrays:
        best_block_map(summary, arrays, out / "best_block_map.png")
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="data folder (a world, or NSD prepared by prepare-nsd)")
    p.add_argument("--subject", type=int, default=1, help="NSD subject number")
    p.add_argument("--encoder", required=True, help="stage-1 encoder checkpoint of this subject")
    p.add_argument("--vision", default=None,
                   help="the vision model the encoder was aligned to: adds its layers as a reference "
                        "(does the encoder inherit the vision model's hierarchy?)")
    p.add_argument("--vision-layers", type=int, nargs="+", default=None,
                   help="vision layers to fit (default: the encoder's g_1..g_M, from its checkpoint)")
    p.add_argument("--out", required=True, help="output folder (interpret.json/.md, heatmap.png, best_block_map.png)")
    p.add_argument("--targets", default=TARGETS[0], choices=TARGETS,
                   help="held-out-repetition: the encoder reads two repetitions, the ridge predicts the third "
                        "(no shared trial noise); average: both from the mean of three (the paper's reading)")
    p.add_argument("--features", default=FEATURES[0], choices=FEATURES,
                   help="tokens: every token of a block, flattened; pooled: their mean")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds over the test images")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold assignment")
    p.add_argument("--rois", default=None,
                   help="NSD only: the subject's func1pt8mm prf-visualrois.nii.gz or streams.nii.gz "
                        "(a world's areas are read from the world itself)")
    p.add_argument("--nsdgeneral", default=None, help="NSD only: the subject's nsdgeneral.nii.gz (with --rois)")
    p.add_argument("--roi-kind", default=None, choices=("prf-visualrois", "streams"),
                   help="which NSD labels --rois holds (default: from its file name)")
    p.add_argument("--limit", type=int, default=None, help="only the first N test images (quick looks)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if (args.rois is None) != (args.nsdgeneral is None):
        raise InterpretError("--rois and --nsdgeneral go together: the labels are read at the mask's voxels")
    result = interpret(Path(args.data), args.subject, Path(args.encoder), args.vision and Path(args.vision),
                       targets=args.targets, features=args.features, folds=args.folds, seed=args.seed,
                       vision_layers=args.vision_layers, rois=args.rois and Path(args.rois),
                       nsdgeneral=args.nsdgeneral and Path(args.nsdgeneral), roi_kind=args.roi_kind,
                       limit=args.limit, show_progress=not args.quiet)
    summary = write_outputs(result, Path(args.out))
    print(markdown(summary))
    print(f"wrote {args.out}/interpret.json, interpret.md, heatmap.png"
          + (", best_block_map.png" if summary.get("layout") else ""))
    return 0
