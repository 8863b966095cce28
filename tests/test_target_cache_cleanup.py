"""A target computation that fails midway leaves no ``*.h5.<pid>.tmp`` behind and loses no
earlier cache. Uses a stand-in vision model (just the interface build_target_cache calls)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from mindhier.vision.targets import TargetCache, build_target_cache

LAYERS, TOKENS, DIM = (1, 2), 3, 4


class StubVision:
    """Deterministic targets; raises on batch number ``fail_at`` (None: never)."""

    num_tokens, feature_dim, text_tokens, text_dim = TOKENS, DIM, 2, DIM

    def __init__(self, fail_at: int | None = None, error: type[BaseException] = RuntimeError):
        self.fail_at, self.error, self.batches = fail_at, error, 0

    def identity(self) -> dict:
        return {"name": "stub"}

    def check_layers(self, layers) -> tuple[int, ...]:
        return tuple(int(g) for g in layers)

    def image_targets(self, images: torch.Tensor, layers):
        if self.batches == self.fail_at:
            raise self.error("vision model failed midway")
        self.batches += 1
        n = len(images)
        return [torch.full((n, TOKENS, DIM), float(g)) for g in layers], torch.ones(n, DIM)


class StubImages:
    def get(self, indices) -> np.ndarray:
        return np.zeros((len(indices), 3, 4, 4), dtype=np.float32)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# The cache is written by src/mindhier/vision/targets.py:build_target_cache, which this change
# could not touch (others are editing vision/); the fix is a try/except around its write.
# strict: once the fix lands this test passes, and the marker must go.
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_build_leaves_no_tmp_and_keeps_the_earlier_cache(tmp_path, error):
    out = tmp_path / "cache" / "targets.h5"
    build_target_cache(StubVision(), StubImages(), np.arange(6), None, LAYERS, out, batch_size=2, show_progress=False)
    before = digest(out)
    with pytest.raises(error, match="failed midway"):
        build_target_cache(StubVision(fail_at=1, error=error), StubImages(), np.arange(10), None, LAYERS, out,
                           batch_size=2, show_progress=False)
    assert sorted(p.name for p in out.parent.iterdir()) == ["targets.h5"]  # no targets.h5.<pid>.tmp
    assert digest(out) == before
    assert len(TargetCache(out)) == 6
