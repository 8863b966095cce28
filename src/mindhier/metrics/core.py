"""The arithmetic of MindEye2's ``final_evaluations`` (SPEC §6), free of any network.

Conventions, fixed here once:
- images are float tensors (N, 3, H, W) in [0, 1]; every resize is bilinear with
  ``align_corners=False`` and *no antialiasing*, which is what ``transforms.Resize`` did to
  tensors in the torchvision MindEye2 ran with (SPEC §6);
- statistics are computed in float64 numpy, like ``np.corrcoef`` in the original notebook;
- two-way identification is returned as a *fraction* in [0, 1] (the original's return value;
  the paper tables print it as a percentage), correlation distance as ``1 - r`` in [0, 2].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

EVAL_SIZE = 256  # everything is first brought to 256×256 (SPEC §6)
PIXEL_SIZE = 425  # PixCorr and SSIM are computed at 425×425
GREY_WEIGHTS = (0.2125, 0.7154, 0.0721)  # skimage.color.rgb2gray, as the original uses


def resize(images: torch.Tensor, size: int, antialias: bool = False) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) to ``size``×``size`` (square inputs, as all here are)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)


def to_eval_size(images: torch.Tensor) -> torch.Tensor:
    """The 256×256, antialias-off pre-resize applied to GT and reconstructions before any metric."""
    return resize(images.float(), EVAL_SIZE, antialias=False)


def _as_rows(x) -> np.ndarray:
    arr = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    return arr.reshape(len(arr), -1).astype(np.float64)


def row_pearson(a, b) -> np.ndarray:
    """Pearson r between row i of ``a`` and row i of ``b`` (one value per row)."""
    a, b = _as_rows(a), _as_rows(b)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))


PIXCORR_CHUNK = 16  # images per block: float64 rows of 3×425×425 stay cache-sized (300 images: 4× faster)

# PixCorr and SSIM below are MindEye2's whole procedure: the 256 px pre-resize, then 425 px, then
# the statistic. evaluate_reconstructions pre-resizes once for all metrics and calls these same
# functions; on images already at 256 px the pre-resize returns its input, so values are
# unchanged. The _*_425 kernels assume 256 px input and are not for callers.


def pixcorr_per_image(recons: torch.Tensor, gts: torch.Tensor) -> np.ndarray:
    """MindEye2's PixCorr per image pair: 256 px, then Pearson r of the flattened RGB pixels at
    425×425. Computed in blocks of PIXCORR_CHUNK images: the same values, bit for bit."""
    blocks = [_pixcorr_425(to_eval_size(recons[i:i + PIXCORR_CHUNK]), to_eval_size(gts[i:i + PIXCORR_CHUNK]))
              for i in range(0, len(recons), PIXCORR_CHUNK)]
    return np.concatenate(blocks) if blocks else np.zeros(0)


def pixcorr(recons: torch.Tensor, gts: torch.Tensor) -> float:
    """MindEye2's PixCorr (↑): the mean of :func:`pixcorr_per_image`."""
    return float(pixcorr_per_image(recons, gts).mean())


def _pixcorr_425(recons256: torch.Tensor, gts256: torch.Tensor) -> np.ndarray:
    return row_pearson(resize(recons256, PIXEL_SIZE), resize(gts256, PIXEL_SIZE))


def to_grey(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) -> (N, H, W) float64 luminance with skimage's rgb2gray weights."""
    w = torch.tensor(GREY_WEIGHTS, dtype=torch.float64).view(1, 3, 1, 1)
    return (images.double() * w).sum(dim=1).cpu().numpy()


def ssim_per_image(recons: torch.Tensor, gts: torch.Tensor) -> np.ndarray:
    """MindEye2's SSIM per image pair: 256 px, then grey-level SSIM at 425×425 with the
    original's settings (Gaussian σ 1.5, population covariance, data range 1)."""
    return _ssim_425(to_eval_size(recons), to_eval_size(gts))


def ssim(recons: torch.Tensor, gts: torch.Tensor) -> float:
    """MindEye2's SSIM (↑): the mean of :func:`ssim_per_image`."""
    return float(ssim_per_image(recons, gts).mean())


def _ssim_425(recons256: torch.Tensor, gts256: torch.Tensor) -> np.ndarray:
    rec = to_grey(resize(recons256, PIXEL_SIZE))
    ref = to_grey(resize(gts256, PIXEL_SIZE))
    return np.array([
        structural_similarity(r, g, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=1.0)
        for r, g in zip(rec, ref)
    ])


def correlation_matrix(real_feats, pred_feats) -> np.ndarray:
    """r[i, j] = Pearson r(real_i, pred_j); equals ``np.corrcoef(real, pred)[:N, N:]``."""
    real, pred = _as_rows(real_feats), _as_rows(pred_feats)
    real = real - real.mean(axis=1, keepdims=True)
    pred = pred - pred.mean(axis=1, keepdims=True)
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    pred /= np.linalg.norm(pred, axis=1, keepdims=True)
    return real @ pred.T


def two_way_per_image(real_feats, pred_feats) -> np.ndarray:
    """For each reconstruction j: the fraction of the other N−1 GT images i whose correlation
    with it is strictly lower than its own GT's, ``mean_i[r[i, j] < r[j, j]]`` over i ≠ j."""
    r = correlation_matrix(real_feats, pred_feats)
    n = len(r)
    if n < 2:
        raise ValueError("two-way identification needs at least 2 images")
    own = np.diag(r)
    wins = (r < own[None, :]).sum(axis=0)  # the diagonal is never < itself: it counts 0
    return wins / (n - 1)


def two_way_identification(real_feats, pred_feats) -> float:
    """Mean two-way identification accuracy as a fraction (0.5 = chance, 1 = perfect)."""
    return float(two_way_per_image(real_feats, pred_feats).mean())


def correlation_distance_per_image(real_feats, pred_feats) -> np.ndarray:
    """``scipy.spatial.distance.correlation(real_i, pred_i)`` = 1 − Pearson r, per pair."""
    return 1.0 - row_pearson(real_feats, pred_feats)


def correlation_distance(real_feats, pred_feats) -> float:
    return float(correlation_distance_per_image(real_feats, pred_feats).mean())
