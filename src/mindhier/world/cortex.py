"""A simulated visual cortex (SPEC §1.3): what each voxel of a subject responds to.

Three ROIs, each a different kind of code for the same images:

* **early** — retinotopic Gaussian receptive fields (small, growing with eccentricity) over
  one channel of an early feature bank: luminance, red–green and blue–yellow opponent signals,
  or Gabor quadrature energy (4 orientations × 2 spatial frequencies).
* **mid** — larger receptive fields over the *visible coverage* of each object, tuned to a
  conjunction of shape attributes (round, straight-edged, pointed, …) and colour; plus
  background texture kind in the uncovered part of the field.
* **high** — position-invariant: object category evidence (each object weighted by its
  visible size, so the main object dominates) and scene content (background kind, number of
  objects, lightness).

A trial's response is ``nonlinearity(drive + latent noise) + voxel noise``, then per-session
gain/offset drift; the writer z-scores per session afterwards. *Latent* noise perturbs the
represented quantity (feature maps, category evidence) and is shared by every voxel reading
it, which is what keeps a linear decoder far from perfect however many voxels it sees.

Every random draw comes from ``default_rng([seed, stream, subject, ...])`` so a world is
reproducible and subjects are independent.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.signal import fftconvolve

from mindhier.data.layout import NSD_VOXELS
from mindhier.world.config import CortexConfig, WorldConfig
from mindhier.world.images import BACKGROUNDS, CATEGORIES, COLOUR_NAMES, COLOURS, SceneSpec

EARLY, MID, HIGH = 0, 1, 2
STREAM_CORTEX, STREAM_TRIALS = 1, 3

# round, straight-edged, pointed, hollow/concave, elongated, multi-part — used by mid voxels.
SHAPE_ATTRIBUTES = np.array([
    (1.0, 0.0, 0.0, 0.0, 0.0, 0.0),  # disc
    (0.0, 1.0, 0.3, 0.0, 0.0, 0.0),  # square
    (0.0, 1.0, 0.8, 0.0, 0.2, 0.0),  # triangle
    (0.0, 1.0, 1.0, 0.4, 0.0, 0.3),  # star
    (1.0, 0.0, 0.0, 1.0, 0.0, 0.0),  # ring
    (0.0, 1.0, 0.2, 0.5, 0.4, 0.6),  # cross
    (0.0, 1.0, 0.5, 0.3, 0.0, 1.0),  # house
    (0.0, 0.8, 0.7, 0.2, 0.6, 1.0),  # tree
    (0.0, 1.0, 0.9, 0.0, 1.0, 0.6),  # arrow
    (0.8, 0.2, 0.5, 0.0, 0.0, 0.3),  # heart
    (0.9, 0.0, 0.7, 0.6, 0.4, 0.0),  # moon
    (0.0, 1.0, 0.9, 0.0, 0.6, 0.0),  # diamond
], dtype=np.float32)
assert len(SHAPE_ATTRIBUTES) == len(CATEGORIES)

N_EARLY_CHANNELS = 11  # L, RG, BY, then energy at 4 orientations × 2 frequencies
_SIGNED_CHANNELS = 3  # the first three channels are signed (a voxel prefers one sign)


def early_channel_probabilities(signed_fraction: float) -> np.ndarray:
    """How early voxels spread over the channels: ``signed_fraction`` read luminance (40 %) or
    colour opponency (30 % each), the rest Gabor energy, evenly over orientation × frequency."""
    signed = signed_fraction * np.array([0.4, 0.3, 0.3])
    energy = np.full(N_EARLY_CHANNELS - _SIGNED_CHANNELS, (1 - signed_fraction) / (N_EARLY_CHANNELS - _SIGNED_CHANNELS))
    return np.concatenate([signed, energy])


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` whose float32 result does not depend on the BLAS thread count.

    OpenBLAS splits sums differently for different thread counts, so plain products differ in
    the last bits between machines (and the world's files would too). Summing in float64 and
    snapping to a 2⁻¹² grid — far below any noise level here — gives identical values except
    with a probability of about 1e-11 per value."""
    out = np.asarray(a, dtype=np.float64) @ np.asarray(b, dtype=np.float64)
    return (np.round(out * 4096.0) / 4096.0).astype(np.float32)


def opponent(rgb: np.ndarray) -> np.ndarray:
    """(…, 3) RGB → (…, 3) luminance, red–green, blue–yellow."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.stack([(r + g + b) / 3, r - g, b - (r + g) / 2], axis=-1)


_PALETTE_OPP = opponent(np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32))


# ---------------------------------------------------------------- features of the images

@dataclasses.dataclass
class WorldFeatures:
    """What the cortex can see of every image (shared by all subjects)."""

    early: np.ndarray  # (N, 11, P) standardised early channel maps, P = grid²
    coverage: np.ndarray  # (N, 3, P) visible coverage of objects 0..2 (0 where absent)
    category: np.ndarray  # (N, 3) category index, -1 where absent
    colour: np.ndarray  # (N, 3) palette index, -1 where absent
    bg_kind: np.ndarray  # (N,)
    bg_colour: np.ndarray  # (N,)


def gabor_bank(image_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Zero-mean quadrature Gabor pairs, 2 wavelengths (image/12, image/6) × 4 orientations."""
    bank = []
    for wavelength in (image_size / 12, image_size / 6):
        sigma = 0.5 * wavelength
        half = int(np.ceil(2.5 * sigma))
        yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
        envelope = np.exp(-(xx**2 + yy**2) / (2 * sigma**2))
        for theta in np.deg2rad([0, 45, 90, 135]):
            phase = 2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / wavelength
            even, odd = envelope * np.cos(phase), envelope * np.sin(phase)
            even -= envelope * even.sum() / envelope.sum()  # no response to flat fields
            bank.append((even / np.abs(even).sum(), odd / np.abs(odd).sum()))
    return bank


def _pool(maps: np.ndarray, grid: int) -> np.ndarray:
    """(n, S, S) → (n, grid·grid) block means."""
    n, s, _ = maps.shape
    f = s // grid
    return maps.reshape(n, grid, f, grid, f).mean(axis=(2, 4)).reshape(n, grid * grid)


def early_maps(images: np.ndarray, grid: int, chunk: int = 256) -> np.ndarray:
    """(N, S, S, 3) images → (N, 11, grid²) raw early channel maps."""
    n, size = images.shape[0], images.shape[1]
    bank = gabor_bank(size)
    pad = max(k[0].shape[0] for k in bank) // 2
    out = np.empty((n, N_EARLY_CHANNELS, grid * grid), dtype=np.float32)
    for start in range(0, n, chunk):
        opp = opponent(images[start:start + chunk].astype(np.float32))
        lum = np.pad(opp[..., 0], ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
        maps = [opp[..., 0], opp[..., 1], opp[..., 2]]
        for even, odd in bank:
            e = fftconvolve(lum, even[None], mode="same", axes=(1, 2))[:, pad:-pad, pad:-pad]
            o = fftconvolve(lum, odd[None], mode="same", axes=(1, 2))[:, pad:-pad, pad:-pad]
            maps.append(np.sqrt(e**2 + o**2))
        for c, m in enumerate(maps):
            out[start:start + chunk, c] = _pool(m.astype(np.float32), grid)
    return out


def compute_features(images: np.ndarray, coverage: np.ndarray, scenes: list[SceneSpec]) -> WorldFeatures:
    """Everything the cortex reads, from rendered images and their scene parameters."""
    n, grid = len(scenes), coverage.shape[-1]
    early = early_maps(images, grid)
    mean = early.mean(axis=(0, 2), keepdims=True)
    std = early.std(axis=(0, 2), keepdims=True) + 1e-6
    category = np.full((n, 3), -1, dtype=np.int64)
    colour = np.full((n, 3), -1, dtype=np.int64)
    for i, scene in enumerate(scenes):
        for k, obj in enumerate(scene.objects):
            category[i, k] = CATEGORIES.index(obj.category)
            colour[i, k] = COLOUR_NAMES.index(obj.colour)
    return WorldFeatures(
        early=((early - mean) / std).astype(np.float32),
        coverage=coverage.reshape(n, 3, grid * grid).astype(np.float32),
        category=category, colour=colour,
        bg_kind=np.array([BACKGROUNDS.index(s.background.kind) for s in scenes]),
        bg_colour=np.array([COLOUR_NAMES.index(s.background.colour) for s in scenes]))


# ---------------------------------------------------------------- one subject's cortex

@dataclasses.dataclass
class SubjectCortex:
    subject: int
    roi: np.ndarray  # (V,) int8: 0 early, 1 mid, 2 high (voxels interleaved like a flattened volume)
    early_rf: np.ndarray  # (P, Ve) Gaussian RF weights, columns sum to 1
    early_channel: np.ndarray  # (Ve,)
    early_sign: np.ndarray  # (Ve,) ±1
    mid_rf: np.ndarray  # (P, Vm)
    mid_shape: np.ndarray  # (categories, Vm) shape tuning
    mid_colour: np.ndarray  # (colours, Vm) colour tuning
    mid_background: np.ndarray  # (background kinds, Vm)
    mid_noise_map: np.ndarray  # (Vm,) which of 4 latent noise maps a mid voxel reads
    high_category: np.ndarray  # (categories, Vh)
    high_scene: np.ndarray  # (scene features, Vh)
    voxel_noise_sd: np.ndarray  # (V,)

    @property
    def n_voxels(self) -> int:
        return len(self.roi)


def n_voxels(cfg: WorldConfig, subject: int) -> int:
    """NSD-like voxel count: the subject's nsdgeneral size times the preset's scale."""
    return max(30, round(NSD_VOXELS.get(subject, 14000) * cfg.voxel_scale))


def _gaussian_rfs(rng: np.random.Generator, n: int, grid: int, sigma_range: tuple[float, float]) -> np.ndarray:
    """(grid², n) receptive fields; centres denser near the fovea, size grows with eccentricity."""
    centre = 0.5 + 0.5 * np.clip(rng.normal(0, 0.45, size=(n, 2)), -1, 1)
    ecc = np.linalg.norm(centre - 0.5, axis=1) / np.sqrt(0.5)
    sigma = (sigma_range[0] + (sigma_range[1] - sigma_range[0]) * ecc) * rng.lognormal(0, 0.15, n)
    t = (np.arange(grid) + 0.5) / grid
    gx, gy = np.meshgrid(t, t, indexing="xy")
    d2 = (gx.reshape(-1, 1) - centre[:, 0]) ** 2 + (gy.reshape(-1, 1) - centre[:, 1]) ** 2
    rf = np.exp(-d2 / (2 * sigma**2))
    return (rf / rf.sum(axis=0, keepdims=True)).astype(np.float32)


def build_cortex(cfg: WorldConfig, seed: int, subject: int) -> SubjectCortex:
    """Draw one subject's voxels: ROI sizes, receptive fields, tunings, noise levels."""
    cx: CortexConfig = cfg.cortex
    rng = np.random.default_rng([seed, STREAM_CORTEX, subject])
    v = n_voxels(cfg, subject)
    sizes = np.floor(np.array(cx.roi_fractions) / sum(cx.roi_fractions) * v).astype(int)
    sizes[0] += v - sizes.sum()
    ve, vm, vh = (int(s) for s in sizes)
    roi = rng.permutation(np.repeat(np.arange(3, dtype=np.int8), sizes))
    n_cat, n_col = len(CATEGORIES), len(COLOUR_NAMES)

    early_channel = rng.choice(N_EARLY_CHANNELS, size=ve, p=early_channel_probabilities(cx.early_signed_fraction))
    early_sign = np.where((early_channel < _SIGNED_CHANNELS) & (rng.random(ve) < 0.5), -1.0, 1.0)

    # mid: shape-attribute preference × Gaussian colour tuning in opponent space
    attr_pref = np.abs(rng.normal(size=(SHAPE_ATTRIBUTES.shape[1], vm))) ** 2
    mid_shape = matmul(SHAPE_ATTRIBUTES, attr_pref) + 0.3 * rng.random((n_cat, vm))
    pref_colour = _PALETTE_OPP[rng.integers(n_col, size=vm)] + rng.normal(0, 0.08, size=(vm, 3))
    d2 = ((_PALETTE_OPP[:, None, :] - pref_colour[None]) ** 2).sum(-1)
    mid_colour = np.exp(-d2 / (2 * 0.25**2)) + 0.1

    # high: a category space with structure (shape attributes + idiosyncratic dims); some
    # voxels are strongly selective for one category, the rest read the space broadly
    rng_space = np.random.default_rng([seed, STREAM_CORTEX, 0])  # the same space for every subject
    space = np.concatenate([SHAPE_ATTRIBUTES, rng_space.normal(0, 0.6, size=(n_cat, 6))], axis=1)
    high_category = matmul(space, rng.normal(size=(space.shape[1], vh)))
    selective = rng.random(vh) < 0.35
    high_category[:, selective] *= 0.3
    high_category[rng.integers(n_cat, size=selective.sum()), np.flatnonzero(selective)] += 2.5

    base_noise = np.array(cx.voxel_noise, dtype=np.float64)[roi]
    return SubjectCortex(
        subject=subject, roi=roi,
        early_rf=_gaussian_rfs(rng, ve, cfg.feature_grid, cx.early_rf_sigma),
        early_channel=early_channel, early_sign=early_sign,
        mid_rf=_gaussian_rfs(rng, vm, cfg.feature_grid, cx.mid_rf_sigma),
        mid_shape=mid_shape.astype(np.float32), mid_colour=mid_colour.astype(np.float32),
        mid_background=rng.random((len(BACKGROUNDS), vm)).astype(np.float32),
        mid_noise_map=rng.integers(4, size=vm),
        high_category=high_category.astype(np.float32),
        high_scene=rng.normal(size=(len(BACKGROUNDS) + 2, vh)).astype(np.float32),
        voxel_noise_sd=base_noise * rng.lognormal(0, cx.voxel_noise_spread, size=v))


# ---------------------------------------------------------------- drive per image

def _standardise(x: np.ndarray) -> np.ndarray:
    return ((x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)).astype(np.float32)


def category_evidence(feats: WorldFeatures) -> np.ndarray:
    """(N, categories): each object votes for its category with sqrt(visible area / main's)."""
    area = feats.coverage.sum(axis=2)
    salience = np.sqrt(area / np.maximum(area[:, :1], 1e-6)) * (feats.category >= 0)
    evidence = np.zeros((len(area), len(CATEGORIES)), dtype=np.float32)
    for k in range(3):
        rows = np.flatnonzero(feats.category[:, k] >= 0)
        np.add.at(evidence, (rows, feats.category[rows, k]), salience[rows, k])
    return evidence


def scene_content(feats: WorldFeatures, images_mean_lum: np.ndarray) -> np.ndarray:
    """(N, kinds + 2): background kind (one-hot), number of objects, mean lightness."""
    onehot = np.eye(len(BACKGROUNDS), dtype=np.float32)[feats.bg_kind]
    n_obj = (feats.category >= 0).sum(axis=1, keepdims=True).astype(np.float32)
    return np.concatenate([onehot, n_obj, images_mean_lum[:, None]], axis=1)


@dataclasses.dataclass
class Drive:
    """Per-image drive of every voxel, standardised over the world's images (unit variance),
    plus what the latent noise of a trial needs."""

    value: np.ndarray  # (N, V) float32
    early_cols: np.ndarray
    mid_cols: np.ndarray
    high_cols: np.ndarray
    high_cat_scale: np.ndarray  # (Vh,) std of the raw category term (latent noise is in its units)
    signal_mean: np.ndarray  # (V,) mean and sd of nonlinearity(value) over images, so that a
    signal_std: np.ndarray  # noiseless response has unit variance


def image_drive(cx: SubjectCortex, feats: WorldFeatures, cfg: CortexConfig) -> Drive:
    """Noiseless drive of every voxel to every image, standardised per voxel."""
    n = feats.early.shape[0]
    cols = [np.flatnonzero(cx.roi == r) for r in (EARLY, MID, HIGH)]
    value = np.empty((n, cx.n_voxels), dtype=np.float32)

    early = np.empty((n, len(cols[0])), dtype=np.float32)
    for c in range(N_EARLY_CHANNELS):
        idx = np.flatnonzero(cx.early_channel == c)
        early[:, idx] = matmul(feats.early[:, c], cx.early_rf[:, idx]) * cx.early_sign[idx]
    value[:, cols[0]] = _standardise(early)

    covered = matmul(feats.coverage.reshape(n * 3, -1), cx.mid_rf)  # (N·3, Vm) object coverage in RF
    covered = covered.reshape(n, 3, -1)
    present = feats.category >= 0
    tuning = (cx.mid_shape[np.maximum(feats.category, 0)] * cx.mid_colour[np.maximum(feats.colour, 0)]
              * present[..., None])
    mid = (covered * tuning).sum(axis=1)
    uncovered = matmul(1 - feats.coverage.sum(axis=1), cx.mid_rf)
    mid += cfg.mid_background_weight * uncovered * cx.mid_background[feats.bg_kind] * cx.mid_colour[feats.bg_colour]
    value[:, cols[1]] = _standardise(mid)

    cat_raw = matmul(category_evidence(feats), cx.high_category)
    lum = feats.early[:, 0].mean(axis=1)
    scene = matmul(_standardise(scene_content(feats, lum)), cx.high_scene)
    w = cfg.high_category_weight
    high_scale = cat_raw.std(axis=0) + 1e-6
    value[:, cols[2]] = _standardise(np.sqrt(w) * _standardise(cat_raw) + np.sqrt(1 - w) * _standardise(scene))
    response = nonlinearity(value)
    return Drive(value, cols[0], cols[1], cols[2], high_scale,
                 response.mean(axis=0), response.std(axis=0) + 1e-6)


# ---------------------------------------------------------------- trials

def nonlinearity(x: np.ndarray) -> np.ndarray:
    """Soft rectification (softplus, slope 1.5): silent-ish below threshold, linear above."""
    return np.logaddexp(0, 1.5 * x) / 1.5


def latent_noise(cx: SubjectCortex, drive: Drive, rng: np.random.Generator, n_trials: int,
                 cfg: CortexConfig) -> np.ndarray:
    """(n_trials, V) noise in the represented quantities, in units of each voxel's drive sd.

    Early/mid: white noise maps seen through each voxel's RF (so voxels with overlapping
    fields share it); high: noise on the category evidence read through the voxel's tuning.
    """
    out = np.empty((n_trials, cx.n_voxels), dtype=np.float32)
    p = cx.early_rf.shape[0]

    def through_rf(maps: np.ndarray, rf: np.ndarray) -> np.ndarray:
        return matmul(maps, rf) / np.linalg.norm(rf, axis=0)

    def map_noise(channel_of_voxel: np.ndarray, field_sd: np.ndarray, rf: np.ndarray, roi: int) -> np.ndarray:
        # white noise maps per channel seen through each RF, plus a whole-field shift per
        # channel (a trial's global colour / luminance fluctuation) shared by all its voxels
        noise = np.empty((n_trials, len(channel_of_voxel)), dtype=np.float32)
        field = rng.standard_normal((n_trials, len(field_sd)), dtype=np.float32) * field_sd.astype(np.float32)
        for c in range(len(field_sd)):
            idx = np.flatnonzero(channel_of_voxel == c)
            local = through_rf(rng.standard_normal((n_trials, p), dtype=np.float32), rf[:, idx])
            noise[:, idx] = cfg.latent_noise[roi] * local + field[:, c:c + 1]
        return noise

    early_field = np.where(np.arange(N_EARLY_CHANNELS) < _SIGNED_CHANNELS, cfg.latent_field_noise[EARLY], 0.0)
    out[:, drive.early_cols] = map_noise(cx.early_channel, early_field, cx.early_rf, EARLY) * cx.early_sign
    out[:, drive.mid_cols] = map_noise(cx.mid_noise_map, np.full(4, cfg.latent_field_noise[MID]), cx.mid_rf, MID)

    evidence_noise = rng.standard_normal((n_trials, len(CATEGORIES)), dtype=np.float32)
    high = matmul(evidence_noise, cx.high_category) / drive.high_cat_scale
    out[:, drive.high_cols] = cfg.latent_noise[HIGH] * np.sqrt(cfg.high_category_weight) * high
    return out


def session_responses(cx: SubjectCortex, drive: Drive, images: np.ndarray, rng: np.random.Generator,
                      cfg: CortexConfig) -> np.ndarray:
    """Raw (not yet z-scored) responses (len(images), V) of one session's trials."""
    n, v = len(images), cx.n_voxels
    x = drive.value[images] + latent_noise(cx, drive, rng, n, cfg)
    r = (nonlinearity(x) - drive.signal_mean) / drive.signal_std
    r += cx.voxel_noise_sd.astype(np.float32) * rng.standard_normal((n, v), dtype=np.float32)
    gain = rng.lognormal(0, cfg.session_gain_sd, size=v).astype(np.float32)
    offset = rng.normal(0, cfg.session_offset_sd, size=v).astype(np.float32)
    return (offset + gain * r).astype(np.float32)


def trial_rng(seed: int, subject: int, session: int) -> np.random.Generator:
    return np.random.default_rng([seed, STREAM_TRIALS, subject, session])
