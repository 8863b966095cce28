"""Hierarchy-to-hierarchy alignment (paper §3.2, Eq. 1–2; SPEC §3).

    L = Σ_m MSE(ℓ2(e_m), ℓ2(v_{g_m}))                  structural alignment, Eq. 1
      + MSE(ℓ2(image_final), ℓ2(v_L)) + MSE(ℓ2(text), ℓ2(t))
      + SoftCLIP(image_final, v_L) + SoftCLIP(text, t)   semantic alignment, Eq. 2

Every tensor is flattened per sample (tokens × width) and ℓ2-normalised before it is compared,
for stability (the paper cites Yu et al. 2022). v_L is the final vision layer on all tokens
(``layer_{L}`` in the target cache); its CLS row is CLIP's pooled image embedding. The paper sums
the terms with weight 1 (§3.2, Algorithm 1); the official code weights the text MSE more (see
:class:`LossConfig`), so its weight is a named field. Algorithm 1's line ``MSELoss(e_M, v_gm)``
is a typo for e_m (otherwise the loop would supervise one tensor M times).

Eq. 2 as printed is a hard InfoNCE; the official code (like MindEye) uses SoftCLIP, whose targets
are the softmaxed similarities among the targets themselves, so near-duplicate images in a batch
are not pushed apart. With τ = 0.005.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mindhier.config import ConfigError
from mindhier.encoder.model import EncoderConfig, EncoderOutput
from mindhier.encoder.targets import check_batch_targets

FINAL_IMAGE, FINAL_TEXT = "final_image", "text"

# The official stage-1 code (github.com/XuZhang2/MindHier, brainencoder/train.py, --mse_scale
# 200000) takes every MSE as 200000 · nn.MSELoss, i.e. the mean over the T·D elements of a
# flattened normalised tensor. Per sample that is 200000/(T·D) times this module's Eq. 1 term:
# 200000/(257·768) ≈ 1.013 for the image levels and the final image, 200000/(77·768) ≈ 3.382
# for the text tokens. Relative to the image terms the official text MSE therefore weighs
# (257·768)/(77·768) = 257/77 ≈ 3.34 (its SoftCLIP terms have weight 1, as here).
OFFICIAL_TEXT_MSE_WEIGHT = 257 / 77


@dataclass(frozen=True)
class LossConfig:
    """Weights of the stage-1 loss terms that are not 1.

    text_mse_weight: factor on MSE(ℓ2(text), ℓ2(t)), relative to the image MSE terms (which,
    like both SoftCLIP terms, keep weight 1). 1.0 is the paper as printed (§3.2: "the sum of the
    above loss terms"; Algorithm 1). ``OFFICIAL_TEXT_MSE_WEIGHT`` (257/77 ≈ 3.34) is the
    official code's relative weighting for CLIP ViT-L/14's 257 image and 77 text tokens, with
    ``mse_reduction="sample"`` (under "element" the official ratio is 1)."""

    text_mse_weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.text_mse_weight >= 0:
            raise ConfigError(f"LossConfig.text_mse_weight must be a number >= 0, got {self.text_mse_weight}")


# Keyed like the encoder's PRESETS. tiny/demo keep the paper's unit weights (the demo's encoder
# was trained so, and its small-CLIP text has 40 tokens, not 77); paper is the official code.
LOSS_PRESETS: dict[str, LossConfig] = {
    "tiny": LossConfig(),
    "demo": LossConfig(),
    "paper": LossConfig(text_mse_weight=OFFICIAL_TEXT_MSE_WEIGHT),
}


def flat_normalized(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) → (B, N) with unit ℓ2 norm per sample, in float32 (losses never run in bf16)."""
    return F.normalize(x.float().flatten(1), dim=-1)


def aligned_mse(pred: torch.Tensor, target: torch.Tensor, reduction: str = "sample") -> torch.Tensor:
    """Eq. 1 for one level: ‖ℓ2(pred) − ℓ2(target)‖² ("sample": summed per sample, mean over the
    batch; = 2 − 2·cos) or the same divided by the number of elements ("element", nn.MSELoss)."""
    diff = flat_normalized(pred) - flat_normalized(target)
    per_sample = diff.pow(2).sum(-1)
    if reduction == "element":
        per_sample = per_sample / diff.shape[1]
    return per_sample.mean()


def soft_clip_loss(pred: torch.Tensor, target: torch.Tensor, tau: float = 0.005) -> torch.Tensor:
    """SoftCLIP between predictions and targets (both (B, ...)), on flattened unit vectors.

    soft = softmax(T·Tᵀ/τ) row-wise; loss = mean_i −Σ_j soft_ij · log_softmax(P·Tᵀ/τ)_ij, averaged
    with the same for the transposed logits (target→prediction direction)."""
    p, t = flat_normalized(pred), flat_normalized(target)
    soft = (t @ t.T / tau).softmax(-1)
    logits = p @ t.T / tau
    forward = -(soft * logits.log_softmax(-1)).sum(-1).mean()
    backward = -(soft * logits.T.log_softmax(-1)).sum(-1).mean()
    return (forward + backward) / 2


def supervised_levels(cfg: EncoderConfig, num_levels: int) -> list[int]:
    """Which levels (0-based) get the structural MSE: all of them, or only the terminal one."""
    return list(range(num_levels)) if cfg.supervision == "hierarchical" else [num_levels - 1]


def encoder_loss(
    out: EncoderOutput,
    targets: dict[str, torch.Tensor],
    layers: tuple[int, ...],
    final_layer: int,
    cfg: EncoderConfig,
    loss_cfg: LossConfig | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts (floats, for logging; unweighted, so runs with other weights
    log comparable parts). total = Σ parts, with ``mse_text`` times ``loss_cfg.text_mse_weight``.

    targets: ``layer_{g}`` (B, T, D) for every g in ``layers`` and for ``final_layer``, and
    ``text`` (B, Tt, Dt). ``layers[m]`` is g_{m+1}, the vision layer level m+1 aligns with."""
    loss_cfg = loss_cfg or LossConfig()
    if len(layers) != len(out.levels):
        raise ValueError(f"{len(out.levels)} encoder levels but {len(layers)} vision layers {layers}")
    check_batch_targets(targets, layers, final_layer, "the target batch")
    parts: dict[str, torch.Tensor] = {}
    for m in supervised_levels(cfg, len(layers)):
        parts[f"mse_e{m + 1}"] = aligned_mse(out.levels[m], targets[f"layer_{layers[m]}"], cfg.mse_reduction)
    v_final, text = targets[f"layer_{final_layer}"], targets["text"]
    parts["mse_final_image"] = aligned_mse(out.image_final, v_final, cfg.mse_reduction)
    parts["mse_text"] = aligned_mse(out.text, text, cfg.mse_reduction)
    parts["softclip_image"] = soft_clip_loss(out.image_final, v_final, cfg.tau)
    parts["softclip_text"] = soft_clip_loss(out.text, text, cfg.tau)
    weights = {"mse_text": loss_cfg.text_mse_weight}
    total = torch.stack([weights.get(k, 1.0) * v for k, v in parts.items()]).sum()
    return total, {k: float(v.detach()) for k, v in parts.items()}
