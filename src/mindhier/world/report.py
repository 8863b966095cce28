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

Ridge penalties are chosen by exact leave-one-out over the training images, from a grid
relative to the mean squared singular value of the data, then refit on all training images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mindhier.data import BetasFile, ImageStore, SubjectIndex
from mindhier.data import layout
from mindhier.errors import MindhierError
from mindhier.world.generate import read_world_info

RELATIVE_ALPHAS = 10.0 ** np.arange(-3.0, 2.01, 0.5)
PIX_RES = 16


# ---------------------------------------------------------------- ridge

class Ridge:
    """Closed-form ridge regression with an intercept; many penalties and targets from one
    eigendecomposition.

    The decomposition is of xcᵀxc (p ≤ n) or of the kernel xc·xcᵀ (p > n), xc the centred
    features, so it costs min(n, p)³; either way it gives U and S² of xc = U S Vᵀ, from which
    fits, exact leave-one-out predictions and weights follow for any penalty. Penalties are
    relative to the mean eigenvalue, so one grid fits any voxel count. float64 throughout:
    leave-one-out divides by 1 − leverage, which is tiny when p ≳ n.
    """

    def __init__(self, x: np.ndarray):
        self.x_mean = x.mean(axis=0, dtype=np.float64)
        xc = x - self.x_mean
        if xc.shape[1] <= xc.shape[0]:
            s2, v = np.linalg.eigh(xc.T @ xc)
            keep = s2 > 1e-9 * s2.max()
            u = (xc @ v[:, keep]) / np.sqrt(s2[keep])
        else:
            s2, u = np.linalg.eigh(xc @ xc.T)
            keep = s2 > 1e-9 * s2.max()
            u = u[:, keep]
        self.xc, self.u, self.s2 = xc, u, s2[keep]
        self.scale = float(self.s2.mean()) if self.s2.size else 1.0  # all-constant features: no directions

    def _penalty(self, relative_alpha: float) -> float:
        return relative_alpha * self.scale

    def loo_predictions(self, y: np.ndarray, relative_alphas) -> dict[float, np.ndarray]:
        """Exact leave-one-out predictions (intercept refit too): yᵢ − eᵢ / (1 − hᵢ).

        Residuals and 1 − h are built from the shrunk-away part α/(S² + α) directly, never as
        differences of nearly equal numbers."""
        n = len(y)
        yc = y - y.mean(axis=0)
        uty = self.u.T @ yc
        outside = yc - self.u @ uty  # what no penalty can fit
        u2 = self.u**2
        free = np.clip(1 - 1 / n - u2.sum(axis=1), 0, None)  # leverage no penalty can take
        out = {}
        for rel in relative_alphas:
            gone = self._penalty(rel) / (self.s2 + self._penalty(rel))
            resid = self.u @ (gone[:, None] * uty) + outside
            one_minus_h = free + u2 @ gone
            out[float(rel)] = y - resid / np.maximum(one_minus_h, 1e-12)[:, None]
        return out

    def predictor(self, y: np.ndarray, relative_alpha: float):
        """w = xcᵀ U (S² + α)⁻¹ Uᵀ yc; returns x_new ↦ (x_new − mean) w + ȳ."""
        y_mean = y.mean(axis=0)
        coef = (self.u.T @ (y - y_mean)) / (self.s2 + self._penalty(relative_alpha))[:, None]
        w = self.xc.T @ (self.u @ coef)
        return lambda x_new: ((x_new - self.x_mean) @ w + y_mean).astype(np.float32)

    def predictions(self, x_new: np.ndarray, y: np.ndarray, relative_alphas) -> dict[float, np.ndarray]:
        """Predictions for ``x_new`` under each penalty, in kernel form: (x_new − mean)·xcᵀ·U·
        (S² + α)⁻¹·Uᵀ·yc + ȳ. Equal to :meth:`predictor`'s, but never forms the (p, targets)
        weight matrix: with p ≫ n (every token of a layer) and thousands of voxels that matrix
        is what would cost the time."""
        y_mean = y.mean(axis=0)
        uty = self.u.T @ (y - y_mean)
        kernel_u = ((x_new - self.x_mean) @ self.xc.T) @ self.u  # (m, r)
        return {float(rel): kernel_u @ (uty / (self.s2 + self._penalty(rel))[:, None]) + y_mean
                for rel in relative_alphas}


def fit_ridges(x: np.ndarray, targets: dict) -> dict:
    """For each ``name: (y, score)`` choose the penalty maximising ``score(loo_pred, y)``
    (leave-one-out over training images), refit on all. Returns name → (predict, alpha)."""
    ridge = Ridge(x)
    out = {}
    for name, (y, score) in targets.items():
        scores = {rel: score(pred, y) for rel, pred in ridge.loo_predictions(y, RELATIVE_ALPHAS).items()}
        best = max(scores, key=scores.get)
        out[name] = (ridge.predictor(y, best), best)
    return out


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


def load_subject(root: str | Path, subject: int) -> dict:
    """A subject's data as the report needs it, read through the MindEye2 readers."""
    root = Path(root)
    params = json.loads(layout.image_params_path(root).read_text())
    roi = np.load(layout.roi_path(root, subject), allow_pickle=False)
    with ImageStore(root) as store:
        index = SubjectIndex(root, subject, images=store)
        with BetasFile(root, subject, expected_voxels=len(roi)) as betas:
            train_rows = np.sort(index.train.trial)
            train_betas = betas.read(train_rows)
            test_order = np.argsort(index.test.trial)
            test_betas = betas.read(index.test.trial[test_order])
        train_trial_images = index.train.image[np.argsort(index.train.trial)]
        test_trial_images = index.test.image[test_order]
        train_ids = np.unique(train_trial_images)
        test_ids = np.unique(test_trial_images)
        images_train, images_test = store.get(train_ids), store.get(test_ids)
    return {
        "roi": roi, "n_categories": len(params["categories"]),
        "main_category": np.array([im["main_category"] for im in params["images"]]),
        "train_trial_images": train_trial_images, "train_betas": train_betas,
        "test_trial_images": test_trial_images, "test_betas": test_betas,
        "images_train": images_train, "images_test": images_test,
    }


def analyse(data: dict) -> dict:
    """Reliability, category decoding and pixel decoding of one subject (module doc)."""
    roi, n_cat = data["roi"], data["n_categories"]
    train_ids, x_train = _average_by_image(data["train_trial_images"], data["train_betas"])
    test_ids, x_test = _average_by_image(data["test_trial_images"], data["test_betas"])
    pix_train, pix_test = _downsample(data["images_train"], PIX_RES), _downsample(data["images_test"], PIX_RES)
    y_train = np.eye(n_cat, dtype=np.float32)[data["main_category"][train_ids]]
    y_test = np.eye(n_cat, dtype=np.float32)[data["main_category"][test_ids]]
    rois = {name: roi == k for k, name in enumerate(layout.ROI_NAMES)}
    rois["all"] = np.ones(len(roi), dtype=bool)
    reliab = split_half(data["test_trial_images"], data["test_betas"])

    category, pixels, alphas = {}, {}, {}
    for name, mask in rois.items():
        fits = fit_ridges(x_train[:, mask], {"category": (y_train, accuracy), "pixels": (pix_train, pixcorr)})
        category[name] = accuracy(fits["category"][0](x_test[:, mask]), y_test)
        pixels[name] = pixcorr(fits["pixels"][0](x_test[:, mask]), pix_test)
        alphas[name] = {target: fit[1] for target, fit in fits.items()}
    pixels["mean_image"] = pixcorr(np.broadcast_to(pix_train.mean(axis=0), pix_test.shape), pix_test)
    test_labels = data["main_category"][test_ids]
    return {
        "voxels": {name: int(m.sum()) for name, m in rois.items()},
        "train_images": len(train_ids), "train_trials": len(data["train_trial_images"]),
        "test_images": len(test_ids), "test_trials": len(data["test_trial_images"]),
        "reliability": {name: float(np.median(reliab[rois[name]])) for name in layout.ROI_NAMES},
        "reliability_method": "median over voxels of Pearson r(showing 1, mean of showings 2-3) across "
                              "test images; not Spearman-Brown corrected",
        "category_accuracy": category,
        "category_chance": 1.0 / n_cat,
        "category_majority": float(np.bincount(test_labels, minlength=n_cat).max() / len(test_ids)),
        "pixcorr": pixels,
        "pixcorr_resolution": f"{PIX_RES}x{PIX_RES}x3",
        "test_policy": "voxels averaged over the 3 showings of each test image",
        "relative_alphas": alphas,
    }


def subject_report(root: str | Path, subject: int) -> dict:
    info = read_world_info(root)
    return {"subject": subject, "world": str(root), "preset": info.get("preset"),
            **analyse(load_subject(root, subject))}


def world_report(root: str | Path, subjects: list[int] | None = None, write: bool = True) -> dict:
    """Reports for ``subjects`` (default: all of the world's); written to ``world/report.json``."""
    info = read_world_info(root)
    known = [s["subject"] for s in info["subjects"]]
    unknown = sorted(set(subjects or []) - set(known))
    if unknown:
        raise MindhierError(f"{layout.world_info_path(root)}: subject(s) {unknown} not in this world; "
                            f"it has subjects {known}")
    subjects = subjects or known
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
