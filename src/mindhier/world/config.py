"""World presets (SPEC §1.3): image size, image counts, subjects, voxels, design, cortex.

Numbers marked *calibrated* were tuned so that the world is neither trivial nor hopeless on
``demo`` (see ``mindhier world --report``): category decoding from the high ROI well above
chance and well below perfect, early-ROI pixel decoding clearly positive, split-half
reliabilities in the range NSD voxels show.
"""

from __future__ import annotations

import dataclasses

from mindhier.config import get_preset


@dataclasses.dataclass(frozen=True)
class CortexConfig:
    """Simulated visual cortex shared by all subjects of a world (cortex.py). Per-ROI tuples
    are (early, mid, high)."""

    roi_fractions: tuple[float, float, float] = (0.45, 0.30, 0.25)
    early_signed_fraction: float = 0.15  # early voxels reading luminance/colour (rest: Gabor energy)
    early_rf_sigma: tuple[float, float] = (0.03, 0.08)  # RF sd, image fractions, fovea → periphery
    mid_rf_sigma: tuple[float, float] = (0.09, 0.2)
    mid_background_weight: float = 0.2  # mid drive from background texture in the uncovered RF
    high_category_weight: float = 0.4  # share of high-ROI drive variance from categories (rest: scene)
    # Trial-to-trial noise *in the represented quantity*, shared by the voxels that read it, so
    # it limits decoding however many voxels there are. Early/mid: sd of white noise on the
    # feature maps, relative to a voxel's drive sd; high: sd of the noise on each category's
    # evidence (a full-size main object has evidence 1).
    latent_noise: tuple[float, float, float] = (0.6, 0.6, 0.9)  # calibrated
    # Whole-field latent noise (early: luminance/colour channels only; mid: per noise map):
    # a trial's global colour fluctuation, the limit on decoding background colour.
    latent_field_noise: tuple[float, float] = (2.5, 1.5)  # calibrated
    # Independent measurement noise per voxel (sd relative to a unit-variance signal).
    voxel_noise: tuple[float, float, float] = (1.2, 1.2, 0.8)  # calibrated
    voxel_noise_spread: float = 0.3  # log-sd of the per-voxel noise level
    session_offset_sd: float = 1.0  # per-session per-voxel offset (removed by z-scoring)
    session_gain_sd: float = 0.2  # per-session per-voxel log-gain


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    image_size: int = 64
    feature_grid: int = 16  # resolution of the cortex's retinotopic maps
    n_train: int = 3000  # training images (each shown up to 3 times)
    n_test: int = 300  # shared test images (each shown exactly 3 times)
    subjects: tuple[int, ...] = (1, 2, 5, 7)
    voxel_scale: float = 0.16  # voxels per subject = round(NSD nsdgeneral count × scale)
    trials_per_session: int = 750
    fewer_reps_fraction: float = 0.1  # training images shown only once or twice
    seed: int = 0
    cortex: CortexConfig = dataclasses.field(default_factory=CortexConfig)

    @property
    def n_images(self) -> int:
        return self.n_train + self.n_test


PRESETS: dict[str, WorldConfig] = {
    # CI: seconds. 2 subjects of a few hundred voxels, 5 sessions of 150 trials. Less latent
    # noise than demo: with 200 images demo's noise leaves too little for tests to see.
    "tiny": WorldConfig(image_size=32, n_train=200, n_test=20, subjects=(1, 2), voxel_scale=0.02,
                        trials_per_session=150,
                        cortex=CortexConfig(latent_noise=(0.4, 0.4, 0.5), latent_field_noise=(1.0, 0.8))),
    # The default: ~2 minutes on 2 cores; 4 subjects of 2000–2500 voxels, 14 sessions each.
    "demo": WorldConfig(),
    # NSD-sized design (9000 + 1000 images, 40 sessions of 750 trials, no missing repeats).
    "large": WorldConfig(image_size=96, n_train=9000, n_test=1000, voxel_scale=0.4, fewer_reps_fraction=0.0),
}


def world_preset(name: str) -> WorldConfig:
    return get_preset(PRESETS, name, "world")
