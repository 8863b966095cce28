"""MindHier† (paper Table 1, the rows marked †: "an auxiliary low-level feature is used").

The paper reaches its † PixCorr/SSIM "with the addition of the low-level feature used in
MindEye2" (§4.2). MindEye2 (Scotti et al., 2024) predicts, beside its CLIP embeddings, a blurry
image: its backbone feeds Linear → 64×7×7 → GroupNorm(1, 64) → a small convolutional upsampler
to the 4×28×28 latent of Stable Diffusion's VAE, decoded by the frozen VAE into a 224 px
picture. We have no VAE offline, so this decoder predicts the low-resolution RGB picture itself:

    voxels (B, V)                                   z-scored betas, repetitions averaged
      └─ MLP: [Linear → LayerNorm → GELU → Dropout] per hidden width → Linear(h → C·g·g)
         reshape to (C, g, g) → GroupNorm(1, C)     (MindEye2's seed grid and norm)
      └─ k × [2× nearest upsample → Conv3×3 → GroupNorm(1, C) → GELU]     g·2^k = S
      └─ Conv1×1 → 3 channels, + logit(mean training image) → sigmoid → (B, 3, S, S) in [0, 1]

The last conv starts at zero, so an untrained decoder draws the mean training image: the
baseline every trained one has to beat. Presets: ``paper`` mirrors MindEye2's branch in size —
4096 hidden, 64 channels, 32×32×3 = 3072 outputs, as many numbers as its 4×28×28 = 3136 latent
— but in pixel space, so no VAE is needed (32 px is about the spatial grain of that 28×28
latent). The final reconstruction is blended with the low-level image, 0.55 · reconstruction +
0.45 · low-level (:func:`blend`; the official MindHier notebook, as issue 12 quotes it).

    model, meta = load_lowlevel("runs/lowlevel/lowlevel", num_voxels=V, subject=1)
    low = predict(model, voxels)                   # (B, 3, S, S); voxels (B, V) or (B, R, V)
    final = blend(recons, low, weight=0.45)        # (B, 3, H, W) in [0, 1]
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mindhier.checkpoint import (CheckpointError, load_checkpoint, load_state_strict, model_tensors, paths_for,
                                 save_checkpoint)
from mindhier.config import from_dict
from mindhier.data.manifest import diff_manifests
from mindhier.encoder.io import check_voxels as check_encoder_voxels
from mindhier.errors import MindhierError

KIND = "lowlevel"
OFFICIAL_BLEND_WEIGHT = 0.45  # the official notebook: 0.55 · reconstruction + 0.45 · low-level image
REQUIRED_META = ("config", "num_voxels", "subject", "data_manifest", "git_commit")
EPS = 1e-3  # keeps logit(mean image) finite where the mean is pure black or white


class LowLevelError(MindhierError, ValueError):
    """A blend weight out of range, images that cannot be blended, or a decoder trained on other data."""


@dataclass(frozen=True)
class LowLevelConfig:
    """Shape of the low-level decoder. The voxel count comes from the data at construction."""

    image_size: int = 16  # S: side of the predicted RGB image
    hidden: tuple[int, ...] = (512,)  # MLP widths between the voxels and the seed grid
    seed_grid: int = 4  # g: the MLP's spatial output, upsampled 2× per conv stage up to S
    channels: int = 32  # C: conv width
    dropout: float = 0.3  # MindEye2's blurry-branch dropout

    def __post_init__(self) -> None:
        ratio = self.image_size // max(1, self.seed_grid)
        if self.seed_grid < 1 or ratio * self.seed_grid != self.image_size or ratio & (ratio - 1):
            raise ValueError(f"image_size {self.image_size} must be seed_grid {self.seed_grid} times a power of 2")
        if any(int(h) < 1 for h in self.hidden) or self.channels < 1 or not 0 <= self.dropout < 1:
            raise ValueError(f"bad low-level config {self}: widths must be >= 1 and dropout in [0, 1)")

    @property
    def upsamples(self) -> int:
        return int(math.log2(self.image_size // self.seed_grid))


PRESETS: dict[str, LowLevelConfig] = {
    # CI: milliseconds per step. No conv stage (seed grid = image): on the tiny world's ~570
    # trials they only added seed-to-seed spread to the held-out PixCorr.
    "tiny": LowLevelConfig(image_size=8, hidden=(64,), seed_grid=8, channels=8, dropout=0.0),
    # The demo world (64 px stimuli): 16 px, a quarter of the side; two conv stages from 4×4.
    # Subject 1, 1500 steps: held-out PixCorr 0.59 (mean training image 0.14).
    "demo": LowLevelConfig(),
    # MindEye2's branch in size (see the module doc): ≈ 81 M parameters for subject 1.
    "paper": LowLevelConfig(image_size=32, hidden=(4096,), seed_grid=8, channels=64),
}


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

def up_block(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, channels, 3, padding=1),
                         nn.GroupNorm(1, channels), nn.GELU())


class LowLevelDecoder(nn.Module):
    def __init__(self, cfg: LowLevelConfig, num_voxels: int):
        super().__init__()
        self.cfg, self.num_voxels = cfg, int(num_voxels)
        widths = (self.num_voxels, *cfg.hidden)
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.LayerNorm(w_out), nn.GELU(), nn.Dropout(cfg.dropout)]
        layers.append(nn.Linear(widths[-1], cfg.channels * cfg.seed_grid ** 2))
        self.mlp = nn.Sequential(*layers)
        self.seed_norm = nn.GroupNorm(1, cfg.channels)
        self.up = nn.Sequential(*[up_block(cfg.channels) for _ in range(cfg.upsamples)])
        self.to_rgb = nn.Conv2d(cfg.channels, 3, 1)
        nn.init.zeros_(self.to_rgb.weight)  # untrained = the mean image, not noise around it
        nn.init.zeros_(self.to_rgb.bias)
        self.register_buffer("mean_logit", torch.zeros(3, cfg.image_size, cfg.image_size))

    def set_mean_image(self, mean: torch.Tensor) -> None:
        """The prior the decoder predicts deviations from: the training targets' mean (3, S, S)."""
        self.mean_logit.copy_(torch.logit(mean.float().clamp(EPS, 1 - EPS)))

    def forward(self, voxels: torch.Tensor) -> torch.Tensor:
        """(B, V) -> (B, 3, S, S) in (0, 1)."""
        g = self.cfg.seed_grid
        x = self.seed_norm(self.mlp(voxels).view(len(voxels), self.cfg.channels, g, g))
        return torch.sigmoid(self.mean_logit + self.to_rgb(self.up(x)))


def check_voxels(meta: dict, num_voxels: int, subject: int | None, where) -> None:
    """The encoder's check and error type (one `except` catches both), with this model's fix."""
    check_encoder_voxels(meta, num_voxels, subject, where, model="the low-level decoder", command="train-lowlevel")


@torch.no_grad()
def predict(model: LowLevelDecoder, voxels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Low-level images (B, 3, S, S) in [0, 1], float32 on the CPU, from voxels (B, V), or from
    (B, R, V) repetitions whose R images are averaged (MindEye2's test policy)."""
    if voxels.ndim not in (2, 3):
        raise LowLevelError(f"voxels must be (B, V) or (B, R, V); got shape {tuple(voxels.shape)}")
    check_voxels({"num_voxels": model.num_voxels}, voxels.shape[-1], None, "this low-level decoder")
    model.eval()
    device = next(model.parameters()).device
    flat = voxels.flatten(0, 1) if voxels.ndim == 3 else voxels
    size = model.cfg.image_size
    out = [model(flat[i:i + batch_size].to(device, torch.float32)).float().cpu()
           for i in range(0, len(flat), batch_size)]
    images = torch.cat(out) if out else torch.zeros(0, 3, size, size)
    return images.unflatten(0, voxels.shape[:2]).mean(1) if voxels.ndim == 3 else images


# ---------------------------------------------------------------------------------------------
# Checkpoints: NAME.safetensors + NAME.json (mindhier.checkpoint), kind "lowlevel"
# ---------------------------------------------------------------------------------------------

def save_lowlevel(path, model: LowLevelDecoder, *, subject: int, data_manifest: dict,
                  extra: dict | None = None, training_tensors: dict | None = None):
    """Weights + the JSON every loader checks: resolved config, voxel count, subject, data
    manifest (git commit and config hash are added by save_checkpoint)."""
    tensors = {**model.state_dict(), **(training_tensors or {})}
    meta = {"num_voxels": model.num_voxels, "subject": int(subject), "data_manifest": data_manifest, **(extra or {})}
    return save_checkpoint(path, tensors, kind=KIND, config=model.cfg, extra=meta)


def check_same_data(meta: dict, manifest: dict, where) -> None:
    """Refuse a decoder trained on other files than ``manifest`` names (e.g. the encoder's)."""
    diffs = diff_manifests(meta["data_manifest"], manifest)
    if diffs:
        raise LowLevelError(
            f"{where} was trained on other data than given:\n  " + "\n  ".join(diffs[:6])
            + f"\nTrain one on this data: `mindhier train-lowlevel --data DIR --subject {meta.get('subject')}`")


def load_lowlevel(path: str | os.PathLike, *, num_voxels: int | None = None, subject: int | None = None,
                  data_manifest: dict | None = None, device: str | torch.device = "cpu"):
    """(decoder in eval mode, metadata) from ``path`` (either file of the pair, or their stem).

    ``num_voxels``/``subject``: of the data you will feed it, to fail early on another subject.
    ``data_manifest``: refuse a decoder trained on other files (pass the encoder's
    ``meta["data_manifest"]`` so both halves of a MindHier† row saw the same data)."""
    tensors, meta = load_checkpoint(path, kind=KIND)
    where = paths_for(path)[1]
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{where} lacks {missing}; it was not written by `mindhier train-lowlevel`")
    if num_voxels is not None:
        check_voxels(meta, num_voxels, subject, where)
    if data_manifest is not None:
        check_same_data(meta, data_manifest, where)
    model = LowLevelDecoder(from_dict(LowLevelConfig, meta["config"]), int(meta["num_voxels"]))
    load_state_strict(model, model_tensors(tensors), paths_for(path)[0])
    return model.to(device).eval(), meta


# ---------------------------------------------------------------------------------------------
# The blend
# ---------------------------------------------------------------------------------------------

def check_blend_weight(weight: float) -> float:
    if not 0.0 <= float(weight) <= 1.0:  # also refuses NaN
        raise LowLevelError(
            f"blend weight {weight} is outside [0, 1]: 0 keeps the reconstruction, 1 replaces it by the "
            f"low-level image; pass --blend-weight between 0 and 1 "
            f"(the official notebook uses {OFFICIAL_BLEND_WEIGHT})")
    return float(weight)


def upsample(lowlevel: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear: its weights are positive, so it never leaves the range of the low-level pixels
    (bicubic rings past them at the blocks' edges), and it adds no detail the branch did not
    predict; it is also the resize MindEye2's evaluation uses. Antialiased only when shrinking."""
    shrink = lowlevel.shape[-1] > size[-1] or lowlevel.shape[-2] > size[-2]
    return F.interpolate(lowlevel.float(), size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink)


def blend(recons: torch.Tensor, lowlevel: torch.Tensor, weight: float = OFFICIAL_BLEND_WEIGHT) -> torch.Tensor:
    """(1 − weight) · recons + weight · lowlevel upsampled to recons' size, clamped to [0, 1].
    recons (B, 3, H, W), lowlevel (B, 3, h, w), both in [0, 1]; float32 out. The default 0.45
    is the official MindHier notebook's (0.55 · reconstruction + 0.45 · low-level image)."""
    weight = check_blend_weight(weight)
    if recons.ndim != 4 or lowlevel.ndim != 4 or recons.shape[:2] != lowlevel.shape[:2]:
        raise LowLevelError(f"cannot blend reconstructions {tuple(recons.shape)} with low-level images "
                            f"{tuple(lowlevel.shape)}: both must be (B, 3, H, W) with the same B")
    low = upsample(lowlevel.to(recons.device), tuple(recons.shape[-2:]))
    return ((1 - weight) * recons.float() + weight * low).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# MindHier† in a reconstruction (mindhier reconstruct --lowlevel)
# ---------------------------------------------------------------------------------------------

METHOD, METHOD_DAGGER = "MindHier", "MindHier†"


def method_name(settings: dict) -> str:
    """The row label a reconstruct folder's settings.json earns: † when a low-level image was blended in."""
    return METHOD_DAGGER if settings.get("lowlevel") else METHOD


def blend_record(path, meta: dict, weight: float) -> dict:
    """What settings.json records of the blend, so every table can say the row is †."""
    return {"checkpoint": str(path), "config_hash": meta.get("config_hash"), "git_commit": meta.get("git_commit"),
            "blend_weight": weight, "upsampling": "bilinear",
            "rule": f"{1 - weight:g} * reconstruction + {weight:g} * low-level image (after best-of-N ranking)"}
