"""Hierarchy-to-hierarchy alignment (paper §3.2, Eq. 1–2; SPEC §3).

    L = Σ_m MSE(ℓ2(e_m), ℓ2(v_{g_m}))                  structural alignment, Eq. 1
      + MSE(ℓ2(image_final), ℓ2(v_L)) + MSE(ℓ2(text), ℓ2(t))
      + SoftCLIP(image_final, v_L) + SoftCLIP(text, t)   semantic alignment, Eq. 2

Every tensor is flattened per sample (tokens × width) and ℓ2-normalised before it is compared,
for stability (the paper cites Yu et al. 2022). v_L is the final vision layer on all tokens
(``layer_{L}`` in the target cache); its CLS row is CLIP's pooled image embedding. All terms
have weight 1: the paper sums them (§3.2, Algorithm 1), and so does this loss. Algorithm 1's line
``MSELoss(e_M, v_gm)`` is a typo for e_m (otherwise the loop would supervise one tensor M times).

Eq. 2 as printed is a hard InfoNCE; the official code (like MindEye) uses SoftCLIP, whose targets
are the softmaxed similarities among the targets themselves, so near-duplicate images in a batch
are not pushed apart. With τ = 0.005.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mindhier.encoder.model import EncoderConfig, EncoderOutput
from mindhier.encoder.targets import check_batch_targets

FINAL_IMAGE, FINAL_TEXT = "final_image", "text"


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
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts (floats, for logging).

    targets: ``layer_{g}`` (B, T, D) for every g in ``layers`` and for ``final_layer``, and
    ``text`` (B, Tt, Dt). ``layers[m]`` is g_{m+1}, the vision layer level m+1 aligns with."""
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
    total = torch.stack(list(parts.values())).sum()
    return total, {k: float(v.detach()) for k, v in parts.items()}
