"""The committed foundation release (checkpoints/foundation): every file loads with its library
loader and this code's configs, carries its model card (with the corpus it saw), and the
releases together stay within the 80 MB budget (a file committed twice, byte for byte, is
stored once by git and counted once)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mindhier.checkpoint import read_metadata

ROOT = Path(__file__).resolve().parents[1] / "checkpoints"
FOUNDATION = ROOT / "foundation"
LOADERS = {"reader": ("mindhier.world.reader", "load_reader"), "vision": ("mindhier.vision", "load_vision"),
           "tokenizer": ("mindhier.tokenizer", "load_tokenizer"), "generator": ("mindhier.reconstruct", "load_generator")}

pytestmark = pytest.mark.skipif(not FOUNDATION.is_dir(), reason=f"no foundation release in {FOUNDATION}")


def released_stages() -> list[str]:
    return [s for s in LOADERS if (FOUNDATION / f"{s}.safetensors").is_file()]


@pytest.mark.parametrize("stage", released_stages())
def test_each_released_stage_loads_and_has_its_card(stage):
    import importlib

    module, name = LOADERS[stage]
    getattr(importlib.import_module(module), name)(FOUNDATION / stage)
    meta = read_metadata(FOUNDATION / stage)
    corpus = meta["released"]["corpus"]
    card = (FOUNDATION / f"{stage}.md").read_text()
    assert f"corpus: {corpus['size']} images of {corpus['image_size']} px, seed {corpus['seed']}" in card
    assert "training time:" in card and meta["released"]["train_seconds"] > 0


def test_vision_release_carries_its_layer_probe():
    if "vision" not in released_stages():
        pytest.skip("no released vision model")
    probe = json.loads((FOUNDATION / "vision_probe.json").read_text())
    depth = read_metadata(FOUNDATION / "vision")["config"]["layers"]
    assert probe["layers"] == list(range(1, depth + 1))
    assert {"embedding", "majority guess"} <= set(probe["rates"])
    assert "What each layer carries" in (FOUNDATION / "vision.md").read_text()


def test_releases_fit_the_size_budget():
    distinct = {hashlib.sha256(p.read_bytes()).hexdigest(): p.stat().st_size for p in ROOT.glob("*/*") if p.is_file()}
    assert sum(distinct.values()) <= 80 * 2**20, sum(distinct.values())
