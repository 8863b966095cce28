"""How well predicted features match the vision targets on held-out images.

- per-level cosine: mean over images of cos(flatten(e_m), flatten(v_{g_m})), one number per
  level (and for the projected final image): does each level land on its vision layer?
- two-way identification (MindEye2's definition): for image i, the fraction of other images j
  for which the prediction is closer to its own target than to j's; averaged (chance 0.5).
- top-1 retrieval: the fraction of images whose prediction is closest to its own target among
  all test images (chance 1/N). Both use cosine similarity of pooled embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flat_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine of flattened (B, ...) tensors → (B,)."""
    return F.cosine_similarity(pred.float().flatten(1), target.float().flatten(1), dim=-1)


def similarity_matrix(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, N) cosine similarities: row i = prediction i against every target."""
    p = F.normalize(pred.float().flatten(1), dim=-1)
    t = F.normalize(target.float().flatten(1), dim=-1)
    return p @ t.T


def two_way_identification(pred: torch.Tensor, target: torch.Tensor) -> float:
    sim = similarity_matrix(pred, target)
    n = sim.shape[0]
    if n < 2:
        raise ValueError("two-way identification needs at least 2 images")
    own = sim.diagonal().unsqueeze(1)
    wins = (own > sim).float().sum(1)  # the diagonal never beats itself
    return float((wins / (n - 1)).mean())


def top1_retrieval(pred: torch.Tensor, target: torch.Tensor) -> float:
    sim = similarity_matrix(pred, target)
    hits = sim.argmax(1) == torch.arange(sim.shape[0], device=sim.device)
    return float(hits.float().mean())
