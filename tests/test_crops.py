"""Stage 2's random-crop augmentation (paper appendix E; the official code's Resize(576, LANCZOS)
→ RandomCrop(512)): sizes, determinism from (seed, step, sample), and the pixels it cuts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mindhier.data.crops import ResizeCrop, lanczos_resize, resize_side, resized_shape, token_mode
from mindhier.errors import MindhierError


def test_resize_side_is_the_official_576_for_512():
    assert resize_side(512) == 576 and resize_side(256) == 288 and resize_side(32) == 36
    assert resized_shape((425, 425), 576) == (576, 576)
    assert resized_shape((400, 600), 576) == (576, 864) and resized_shape((600, 400), 576) == (864, 576)


def test_crops_are_deterministic_in_range_and_differ_across_steps_and_samples():
    crop = ResizeCrop(size=512, source=(425, 425), seed=3)
    slots = range(80)
    first = crop.offsets(step=7, slots=slots)
    assert first.shape == (80, 2) and first.min() >= 0 and first.max() <= 576 - 512
    np.testing.assert_array_equal(first, ResizeCrop(512, (425, 425), 3).offsets(7, slots))   # same inputs, same crops
    np.testing.assert_array_equal(first[10:20], crop.offsets(7, range(10, 20)))   # a rank's share: its own slots
    assert not np.array_equal(first, crop.offsets(8, slots))                    # another step
    assert not np.array_equal(first, ResizeCrop(512, (425, 425), 4).offsets(7, slots))   # another seed
    assert len({tuple(o) for o in first}) > 40                                  # samples of one step differ
    both_ends = np.concatenate([crop.offsets(s, slots) for s in range(50)])
    assert both_ends.min() == 0 and both_ends.max() == 64                       # RandomCrop's range, ends included


def test_resize_crop_cuts_the_window_of_the_lanczos_resize():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.random((3, 3, 20, 20), dtype=np.float32))
    crop = ResizeCrop(size=16, source=(20, 20), seed=0)
    assert crop.resized == (18, 18)
    offsets = crop.offsets(0, range(3))
    out = crop(images, offsets)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    big = lanczos_resize(images, (18, 18))
    for i, (top, left) in enumerate(offsets):
        assert torch.equal(out[i], big[i, :, top:top + 16, left:left + 16])
    with pytest.raises(MindhierError, match=r"images are \(16, 16\), expected \(20, 20\)"):
        crop(images[..., :16, :16], offsets)


def test_lanczos_resize_matches_pil_lanczos_on_uint8():
    """The official code resizes the uint8 PIL image with LANCZOS; ours filters the float pixels
    the same way, so they agree to the uint8 step (pixels kept off 0 and 255: PIL's uint8 path
    clips and rounds between its horizontal and vertical passes, ours only at the end)."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(64, 192, (21, 21, 3), dtype=np.uint8)
    official = np.asarray(Image.fromarray(pixels).resize((24, 24), Image.LANCZOS)).transpose(2, 0, 1) / 255.0
    ours = lanczos_resize(torch.from_numpy(pixels.transpose(2, 0, 1)[None] / 255.0).float(), (24, 24))[0].numpy()
    assert np.abs(ours - official).max() <= 1.5 / 255


def test_token_mode_caches_whole_images_only():
    assert token_mode(None, "none") == "cached" and token_mode(None, "resize-crop") == "on-the-fly"
    assert token_mode("on-the-fly", "none") == "on-the-fly"
    with pytest.raises(MindhierError, match="--tokens cached cannot be used with --crop resize-crop"):
        token_mode("cached", "resize-crop")
