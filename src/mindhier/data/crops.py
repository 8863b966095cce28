"""Random-crop augmentation of stage 2 (paper appendix E: "Training images are augmented using
random crops of 512×512 resolution").

The official code does ``Resize(576, LANCZOS) → RandomCrop(512)`` on NSD's 425-px stimuli;
:class:`ResizeCrop` is that for any generator size: the shorter side is resized to
round(size · 576/512) with a Lanczos filter (PIL's, on float pixels: no uint8 rounding), then a
size × size window is cut out. Unlike torchvision's RandomCrop, the window is drawn from
(seed, step, sample) alone — the sample's slot in the step's global batch — so a resumed run,
and 1 or N processes, cut the same crops. Crops change the tokens of every step, so they are
tokenized on the fly (the token cache holds whole images only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mindhier.errors import MindhierError

CROP_MODES = ("none", "resize-crop")
OFFICIAL_RESIZE, OFFICIAL_CROP = 576, 512  # the official code's Resize(576) → RandomCrop(512)
CROP_STREAM = 0x0C809  # keeps the crop draws apart from every other use of the run's seed


def token_mode(requested: str | None, crop: str) -> str:
    """``--tokens``: the cache holds whole images, so crops (new at every step) go on the fly."""
    if requested == "cached" and crop != "none":
        raise MindhierError(f"--tokens cached cannot be used with --crop {crop}: every step cuts new crops, whose "
                            "tokens are computed on the fly; drop --tokens, or use --crop none")
    return requested or ("cached" if crop == "none" else "on-the-fly")


def resize_side(size: int) -> int:
    """The side the shorter edge is resized to before a ``size`` crop: 576 for 512."""
    return round(size * OFFICIAL_RESIZE / OFFICIAL_CROP)


def resized_shape(shape: tuple[int, int], side: int) -> tuple[int, int]:
    """(H, W) after resizing the shorter edge to ``side``, aspect kept (torchvision's rule)."""
    h, w = shape
    if h <= w:
        return side, int(side * w / h)
    return int(side * h / w), side


def lanczos_resize(images01: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(n, 3, H, W) in [0, 1] → (n, 3, *shape), Lanczos per channel in float ("F" mode), clamped:
    Lanczos overshoots at edges."""
    from PIL import Image

    pixels = images01.detach().cpu().float().numpy()
    out = np.empty(pixels.shape[:2] + tuple(shape), dtype=np.float32)
    for i, image in enumerate(pixels):
        for c, channel in enumerate(image):
            plane = Image.fromarray(np.ascontiguousarray(channel))
            out[i, c] = np.asarray(plane.resize((shape[1], shape[0]), Image.LANCZOS))
    return torch.from_numpy(out).clamp_(0, 1)


@dataclass(frozen=True)
class ResizeCrop:
    """Resize(round(size·576/512), Lanczos) → a size × size crop at offsets from (seed, step, slot)."""

    size: int  # the generator's (tokenizer's) image side
    source: tuple[int, int]  # (H, W) of the stimuli
    seed: int

    @property
    def resized(self) -> tuple[int, int]:
        return resized_shape(self.source, resize_side(self.size))

    def offsets(self, step: int, slots) -> np.ndarray:
        """(n, 2) top-left corners (row, column) of the crops of global-batch ``slots`` at ``step``."""
        room_h, room_w = (r - self.size for r in self.resized)
        out = np.empty((len(slots), 2), dtype=np.int64)
        for k, slot in enumerate(slots):
            rng = np.random.default_rng([CROP_STREAM, int(self.seed) % 2**63, int(step), int(slot)])
            out[k] = rng.integers(0, room_h + 1), rng.integers(0, room_w + 1)  # uniform, both ends included
        return out

    def __call__(self, images01: torch.Tensor, offsets: np.ndarray) -> torch.Tensor:
        """(n, 3, H, W) stimuli in [0, 1] → (n, 3, size, size) crops."""
        if tuple(images01.shape[-2:]) != tuple(self.source):
            raise MindhierError(f"resize-crop: images are {tuple(images01.shape[-2:])}, expected {self.source}")
        big = lanczos_resize(images01, self.resized)
        s = self.size
        return torch.stack([big[i, :, top:top + s, left:left + s] for i, (top, left) in enumerate(offsets)])
