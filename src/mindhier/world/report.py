"""How informative is a world's simulated cortex? (``mindhier world --report DIR``)

Everything is read back from disk through the real MindEye2 readers (``mindhier.data``), so
the report also checks that the files are what NSD loaders expect. On the held-out test images:

* **reliability** per ROI: median over voxels of the Pearson r, across test images, between
  the first showing and the mean of the other two (split-half, *not* Spearman–Brown corrected);
* **category decoding**: closed-form ridge regression from a ROI's voxels to the one-hot
  category of each image's main object, trained on training images (repetitions averaged),
  tested on test images (3 repetitions averaged, MindHier's policy); accuracy vs chance;
* **pixel decoding**: the same ridge to the image downsampled to 16×16×3; PixCorr = mean over
  test images of the Pearson r between predicted and true pixels (the MindEye2 metric, at
  16×16). ``mean_image`` is the PixCorr of always predicting the mean training image.

Ridge penalties are chosen on a seeded 20 % validation split of the training images, from a
grid relative to the mean squared singular value of the data, then refit on all training
images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mindhier.data import BetasFile, ImageStore, SubjectIndex
from mindhier.data import layout
from mindhier.world.generate import read_world_info

RELATIVE_ALPHAS = 10.0 ** np.arange(-3.0, 2.01, 0.5)
PIX_RES = 16
VALIDATION_FRACTION = 0.2


# ---------------------------------------------------------------- ridge

def ridge_fits(x: np.ndarray, y: np.ndarray, relative_alphas=RELATIVE_ALPHAS):
    """Yield (relative alpha, predict) for each penalty; one SVD serves them all.

    Both x and y are centred on their training means (an unpenalised intercept)."""
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    u, s, vt = np.linalg.svd(x - x_mean, full_matrices=False)
    uty = u.T @ (y - y_mean)
    scale = float(np.mean(s**2))
    for rel in relative_alphas:
        w = vt.T @ ((s / (s**2 + rel * scale))[:, None] * uty)
        yield float(rel), (lambda xn, w=w: (xn - x_mean) @ w + y_mean)


def fit_ridge(x: np.ndarray, y: np.ndarray, score, rng: np.random.Generator):
    """Choose the penalty by ``score(pred, true)`` on a validation split, refit on everything.
    Returns (predict, relative alpha)."""
    order = rng.permutation(len(x))
    n_val = max(1, int(round(VALIDATION_FRACTION * len(x))))
    val, fit = order[:n_val], order[n_val:]
    scores = {rel: score(predict(x[val]), y[val]) for rel, predict in ridge_fits(x[fit], y[fit])}
    best = max(scores, key=scores.get)
    (_, predict), = ridge_fits(x, y, [best])
    return predict, best


def accuracy(pred: np.ndarray, onehot: np.ndarray) -> float:
    return float(np.mean(pred.argmax(axis=1) == onehot.argmax(axis=1)))


def pixcorr(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean over images of the Pearson r between flattened predicted and true images."""
    p = pred - pred.mean(axis=1, keepdims=True)
    t = true - true.mean(axis=1, keepdims=True)
    r = (p * t).sum(axis=1) / np.sqrt((p**2).sum(axis=1) * (t**2).sum(axis=1) + 1e-12)
    return float(np.mean(r))


def columnwise_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    return (a * b).sum(axis=0) / np.sqrt((a**2).sum(axis=0) * (b**2).sum(axis=0) + 1e-12)


# ---------------------------------------------------------------- reading a subject back

def _average_by_image(images: np.ndarray, betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique images (ascending) and their betas averaged over repetitions."""
    unique, inverse = np.unique(images, return_inverse=True)
    sums = np.zeros((len(unique), betas.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, betas)
    return unique, (sums / np.bincount(inverse)[:, None]).astype(np.float32)


def split_half(test_images: np.ndarray, test_betas: np.ndarray) -> np.ndarray:
    """Per-voxel r between the first showing and the mean of the later ones, across test
    images (trials are in betas-row order, so 'first' is first in time)."""
    first, rest = [], []
    for image in np.unique(test_images):
        rows = np.flatnonzero(test_images == image)
        if len(rows) >= 2:
            first.append(test_betas[rows[0]])
            rest.append(test_betas[rows[1:]].mean(axis=0))
    return columnwise_corr(np.array(first), np.array(rest))


def _downsample(images: np.ndarray, res: int) -> np.ndarray:
    """(n, 3, H, W) → (n, res·res·3) block means (H, W cropped to a multiple of res)."""
    n, c, h, w = images.shape
    fh, fw = h // res, w // res
    x = images[:, :, :fh * res, :fw * res].reshape(n, c, res, fh, res, fw).mean(axis=(3, 5))
    return x.reshape(n, -1)


def subject_report(root: str | Path, subject: int, seed: int = 0) -> dict:
    root = Path(root)
    info = read_world_info(root)
    params = json.loads(layout.image_params_path(root).read_text())
    main_category = np.array([im["main_category"] for im in params["images"]])
    n_cat = len(params["categories"])
    roi = np.load(layout.roi_path(root, subject), allow_pickle=False)

    with ImageStore(root) as store:
        index = SubjectIndex(root, subject, images=store)
        with BetasFile(root, subject, expected_voxels=len(roi)) as betas:
            train_betas = betas.read(np.sort(index.train.trial))
            train_order = np.argsort(index.train.trial)
            test_order = np.argsort(index.test.trial)
            test_betas = betas.read(index.test.trial[test_order])
        train_ids, x_train = _average_by_image(index.train.image[train_order], train_betas)
        test_trial_images = index.test.image[test_order]
        test_ids, x_test = _average_by_image(test_trial_images, test_betas)
        pix_train = _downsample(store.get(train_ids), PIX_RES)
        pix_test = _downsample(store.get(test_ids), PIX_RES)

    rois = {name: roi == k for k, name in enumerate(layout.ROI_NAMES)}
    rois["all"] = np.ones(len(roi), dtype=bool)
    reliab = split_half(test_trial_images, test_betas)
    y_train = np.eye(n_cat, dtype=np.float32)[main_category[train_ids]]
    y_test = np.eye(n_cat, dtype=np.float32)[main_category[test_ids]]

    category, pixels, alphas = {}, {}, {}
    for name, mask in rois.items():
        predict, a_cat = fit_ridge(x_train[:, mask], y_train, accuracy, np.random.default_rng([seed, 1]))
        category[name] = accuracy(predict(x_test[:, mask]), y_test)
        predict, a_pix = fit_ridge(x_train[:, mask], pix_train, pixcorr, np.random.default_rng([seed, 2]))
        pixels[name] = pixcorr(predict(x_test[:, mask]), pix_test)
        alphas[name] = {"category": a_cat, "pixels": a_pix}
    pixels["mean_image"] = pixcorr(np.broadcast_to(pix_train.mean(axis=0), pix_test.shape), pix_test)

    return {
        "subject": subject, "world": str(root), "preset": info.get("preset"),
        "voxels": {name: int(m.sum()) for name, m in rois.items()},
        "train_images": len(train_ids), "train_trials": len(index.train), "test_images": len(test_ids),
        "test_trials": len(index.test),
        "reliability": {name: float(np.median(reliab[rois[name]])) for name in layout.ROI_NAMES},
        "reliability_method": "median over voxels of Pearson r(showing 1, mean of showings 2-3) across "
                              "test images; not Spearman-Brown corrected",
        "category_accuracy": category,
        "category_chance": 1.0 / n_cat,
        "category_majority": float(np.bincount(main_category[test_ids], minlength=n_cat).max() / len(test_ids)),
        "pixcorr": pixels,
        "pixcorr_resolution": f"{PIX_RES}x{PIX_RES}x3",
        "test_policy": "voxels averaged over the 3 showings of each test image",
        "relative_alphas": alphas,
    }


def world_report(root: str | Path, subjects: list[int] | None = None, write: bool = True) -> dict:
    """Reports for ``subjects`` (default: all of the world's); written to ``world/report.json``."""
    info = read_world_info(root)
    subjects = subjects or [s["subject"] for s in info["subjects"]]
    report = {"world": str(root), "subjects": {str(s): subject_report(root, s) for s in subjects}}
    if write:
        (layout.world_dir(root) / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def format_report(report: dict) -> str:
    lines = []
    for r in report["subjects"].values():
        lines.append(f"subject {r['subject']}: {r['train_images']} training images ({r['train_trials']} trials), "
                     f"{r['test_images']} test images ({r['test_trials']} trials)")
        lines.append(f"  {'ROI':<8}{'voxels':>8}{'reliab.':>9}{'category':>10}{'PixCorr':>9}")
        for name in (*layout.ROI_NAMES, "all"):
            rel = r["reliability"].get(name)
            rel_s = f"{rel:>9.3f}" if rel is not None else f"{'':>9}"
            lines.append(f"  {name:<8}{r['voxels'][name]:>8}{rel_s}{r['category_accuracy'][name]:>10.1%}"
                         f"{r['pixcorr'][name]:>9.3f}")
        lines.append(f"  category chance {r['category_chance']:.1%} (majority class {r['category_majority']:.1%}); "
                     f"PixCorr of the mean image {r['pixcorr']['mean_image']:.3f} ({r['pixcorr_resolution']})")
    lines.append("reliability: " + next(iter(report["subjects"].values()))["reliability_method"])
    return "\n".join(lines)
