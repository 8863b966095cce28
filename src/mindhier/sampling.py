"""Sampling reconstructions from the stage-2 generator (SPEC §5; paper §3.3, appendix E).

Scale by scale, coarse to fine: the generator predicts all tokens of scale k at once, the
tokenizer adds them to the running latent f̂ and gives the input of scale k+1, and after the last
scale the decoder turns f̂ into the image.

* Classifier-free guidance with Switti's ramp: t = cfg·k/(K−1) (k 0-based), logits =
  (1+t)·cond − t·null, where the null condition is the encoder's output for all-zero voxels.
  Optionally off from scale j on (only the conditional half is run from there: faster).
* top-k then top-p (nucleus) filtering, then one multinomial draw per token.
* The cross-attention K/V of every layer are computed once per image and reused at every scale.
* Seeded per image: image i's candidate c draws from its own ``torch.Generator`` seeded from
  (seed, image id, c), so an image does not depend on the batch it is in or the world size.
* Best-of-N (paper appendix E, after MindEye/MindBridge): N candidates per image ranked by the
  cosine similarity of their vision embedding to the encoder's *predicted* embedding — never to
  the ground-truth image. Single-shot (candidate 0) and best-of-N are both returned, labelled.
* Decoded one image at a time: CPU convolution kernels (oneDNN) round differently for
  different batch sizes (by ~1e-6), and an image must not depend on the batch it was drawn in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mindhier.errors import MindhierError
from mindhier.generator import Condition, ScaleAwareGenerator


class SamplingError(MindhierError, ValueError):
    """Sampling settings or inputs that cannot work together."""


@dataclass(frozen=True)
class SamplingSettings:
    """Defaults are the paper's (SPEC §5): top-k 400, top-p 0.95, cfg 6, N = 4 candidates."""

    cfg: float = 6.0
    top_k: int = 400                # 0 = no top-k filtering
    top_p: float = 0.95             # 1.0 = no nucleus filtering
    cfg_off_from: int | None = None  # 0-based scale from which CFG is off (None: CFG at every scale)
    seed: int = 0
    num_candidates: int = 4         # N of best-of-N (1: single-shot only)

    def __post_init__(self):
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"need top_k ≥ 0 and 0 < top_p ≤ 1, got top_k={self.top_k}, top_p={self.top_p}")
        if self.num_candidates < 1:
            raise SamplingError(f"num_candidates must be ≥ 1, got {self.num_candidates}")


def image_seed(seed: int, image_id: int, candidate: int = 0) -> int:
    """A well-mixed 63-bit seed for one (run seed, image, candidate): independent of batching."""
    return int(np.random.SeedSequence([seed, image_id, candidate]).generate_state(2, np.uint64)[0] >> 1)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to −inf every logit outside the top-k, then outside the smallest set of most likely
    tokens whose probability reaches top_p (the most likely token always survives)."""
    logits = logits.float()
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs          # mass of the strictly more likely tokens
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw_tokens(logits: torch.Tensor, rngs: Sequence[torch.Generator]) -> torch.Tensor:
    """One multinomial draw per token; row b of the batch uses only ``rngs[b]``."""
    probs = logits.softmax(dim=-1)
    return torch.stack([torch.multinomial(probs[b], 1, generator=rngs[b])[:, 0] for b in range(len(rngs))])


def guidance_weight(cfg: float, si: int, num_scales: int) -> float:
    """Switti's linear CFG ramp: 0 at the first scale, cfg at the last."""
    return cfg * si / max(1, num_scales - 1)


@torch.no_grad()
def sample_indices(generator: ScaleAwareGenerator, tokenizer, cond: Condition,
                   null_cond: Condition | None, settings: SamplingSettings,
                   rngs: Sequence[torch.Generator],
                   on_scale: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """Token maps r_1..r_K, each (B, pn_k²), for a batch of conditions (one generator each).

    ``null_cond`` None (or cfg 0) samples without guidance. ``on_scale(k)`` is called when
    scale k is done (the benchmark times scales with it); ``on_scale(-1)`` after the K/V cache."""
    B = cond.batch_size
    if len(rngs) != B:
        raise SamplingError(f"{len(rngs)} random generators for a batch of {B}")
    if tuple(tokenizer.scales) != tuple(generator.cfg.scales):
        raise SamplingError(
            f"tokenizer scales {tuple(tokenizer.scales)} ≠ generator scales {generator.cfg.scales}: "
            f"the generator was trained with another tokenizer")
    guided = null_cond is not None and settings.cfg != 0
    both = Condition.cat([cond, null_cond]) if guided else cond
    cache = generator.cross_attn_cache(both)        # once per image, reused at every scale
    if on_scale is not None:
        on_scale(-1)
    K = generator.cfg.num_scales
    fhat, x_in, indices = None, None, []
    for si in range(K):
        use_cfg = guided and (settings.cfg_off_from is None or si < settings.cfg_off_from)
        if guided and not use_cfg and both.batch_size == 2 * B:
            both, cache = both.take(slice(0, B)), cache.take(slice(0, B))   # drop the null half
        x = x_in if x_in is None or both.batch_size == B else torch.cat([x_in, x_in])
        logits = generator.forward_scale(si, x, both, cache).float()
        if use_cfg:
            t = guidance_weight(settings.cfg, si, K)
            logits = (1 + t) * logits[:B] - t * logits[B:]
        idx = draw_tokens(filter_logits(logits, settings.top_k, settings.top_p), rngs)
        indices.append(idx)
        fhat, x_in = tokenizer.next_scale_input(si, fhat, tokenizer.embed_indices(si, idx))
        if on_scale is not None:
            on_scale(si)
    return indices


@dataclass
class Reconstructions:
    """Images in [0, 1], (B, 3, H, W), labelled by how they were chosen."""

    single_shot: torch.Tensor                      # candidate 0 of every image
    best_of_n: torch.Tensor | None                 # None when N = 1
    num_candidates: int
    scores: torch.Tensor | None = None             # (B, N) cosine similarity to the prediction
    chosen: torch.Tensor | None = None             # (B,) winning candidate
    indices: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    cumulative: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # label → K × (B,3,H,W)

    @property
    def labels(self) -> list[str]:
        return ["single-shot"] + ([f"best-of-{self.num_candidates}"] if self.best_of_n is not None else [])

    def by_label(self, label: str) -> torch.Tensor:
        return self.single_shot if label == "single-shot" else self.best_of_n


def rank_candidates(candidates01: torch.Tensor, predicted: torch.Tensor,
                    embed_images: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Cosine similarity (B, N) between each candidate's vision embedding and the encoder's
    predicted embedding of its image. candidates01: (B, N, 3, H, W); predicted: (B, ...)."""
    B, N = candidates01.shape[:2]
    emb = embed_images(candidates01.flatten(0, 1)).float().reshape(B, N, -1)
    target = predicted.float().reshape(B, 1, -1).to(emb.device)
    return F.cosine_similarity(emb, target, dim=-1)


@torch.no_grad()
def reconstruct(generator: ScaleAwareGenerator, tokenizer, cond: Condition, null_cond: Condition | None,
                settings: SamplingSettings, image_ids: Sequence[int], *,
                predicted: torch.Tensor | None = None,
                embed_images: Callable[[torch.Tensor], torch.Tensor] | None = None,
                return_cumulative: bool = False,
                on_scale: Callable[[int], None] | None = None) -> Reconstructions:
    """Reconstruct a batch: N candidates per image (seeded per image and candidate), decode,
    and pick the best by similarity to the encoder's ``predicted`` embedding (B, ...) under
    ``embed_images`` ([0,1] images → embeddings). ``image_ids`` are the images' global indices.
    ``on_scale`` is passed to :func:`sample_indices` (bench/device_check.py times scales with it)."""
    B, N = cond.batch_size, settings.num_candidates
    if len(image_ids) != B:
        raise SamplingError(f"{len(image_ids)} image ids for a batch of {B}")
    if N > 1 and (predicted is None or embed_images is None):
        raise SamplingError("best-of-N needs the encoder's predicted embedding and an image embedder")
    device = cond.context.device
    rngs = []
    for i in image_ids:
        for c in range(N):
            rngs.append(torch.Generator(device=device).manual_seed(image_seed(settings.seed, int(i), c)))
    rows = torch.arange(B, device=device).repeat_interleave(N)    # image of each (image, candidate)
    indices = sample_indices(generator, tokenizer, cond.take(rows),
                             None if null_cond is None else null_cond.take(rows), settings, rngs, on_scale)
    images = decode_each(tokenizer, indices).unflatten(0, (B, N))
    per_image = [idx.unflatten(0, (B, N)) for idx in indices]
    out = Reconstructions(single_shot=images[:, 0], best_of_n=None, num_candidates=N)
    out.indices["single-shot"] = [idx[:, 0] for idx in per_image]
    if N > 1:
        out.scores = rank_candidates(images, predicted, embed_images)
        out.chosen = out.scores.argmax(dim=1).to(device)
        pick = torch.arange(B, device=device)
        out.best_of_n = images[pick, out.chosen]
        out.indices[f"best-of-{N}"] = [idx[pick, out.chosen] for idx in per_image]
    if return_cumulative:
        for label, idx in out.indices.items():
            out.cumulative[label] = cumulative_each(tokenizer, idx)
    return out


def decode_each(tokenizer, indices: list[torch.Tensor]) -> torch.Tensor:
    """Token maps r_1..r_K (each (B, pn_k²)) → images (B, 3, H, W) in [0, 1], one image per
    decoder pass so that no image depends on its batch (see the module docstring)."""
    return torch.cat([tokenizer.output_to_images01(tokenizer.indices_to_img([r[b:b + 1] for r in indices]).float())
                      for b in range(indices[0].shape[0])])


def cumulative_each(tokenizer, indices: list[torch.Tensor]) -> list[torch.Tensor]:
    """The picture after every scale, K × (B, 3, H, W) in [0, 1], decoded one image at a time."""
    per_image = [tokenizer.cumulative_images([r[b:b + 1] for r in indices]) for b in range(indices[0].shape[0])]
    return [torch.cat([tokenizer.output_to_images01(steps[k].float()) for steps in per_image])
            for k in range(len(indices))]
