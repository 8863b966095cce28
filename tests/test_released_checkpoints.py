"""The committed demo checkpoints (checkpoints/demo): they fit this code's configs, and the
fixed regression subset of test images reconstructs to the metrics recorded in their model
cards (``metrics.json`` → ``regression``), within ``REGRESSION_TOLERANCE``.

Generates the demo world (about a minute on 2 cores, ~600 MB in the pytest temp folder)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mindhier.demo import RECIPES, check_released_against_code, check_same_data, ensure_world, released_checkpoints
from mindhier.demo_release import REGRESSION_TOLERANCE, regression_metrics

RELEASED = Path(__file__).resolve().parents[1] / "checkpoints" / "demo"
FOUNDATION_ROLES = ("vision", "tokenizer")  # copied byte for byte from checkpoints/foundation by the release

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (RELEASED / "metrics.json").is_file(),
                       reason=f"no released demo checkpoints in {RELEASED} (nothing to regress against)"),
]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    world = tmp_path_factory.mktemp("released") / "world"
    ensure_world(world, "demo")
    ck = released_checkpoints(RELEASED, RECIPES["demo"])
    return world, ck


def test_released_checkpoints_fit_the_code_and_the_world(released):
    world, ck = released
    check_released_against_code(ck, RECIPES["demo"])
    check_same_data(ck["encoder"], world, 1)
    for stage in ck:
        card = (RELEASED / f"{stage}.md").read_text()
        assert "config hash" in card, stage
        if stage in FOUNDATION_ROLES:  # frozen foundation models: their own card, copied unchanged
            assert card == (RELEASED.parent / "foundation" / f"{stage}.md").read_text(), stage
        else:
            assert "Held-out metrics" in card, stage


REGRESSION_METRICS = ("pixcorr", "ssim", "clip_ours", "lite0_twoway", "lite0_dist")


def test_regression_subset_reconstructs_to_the_model_card_metrics(released, tmp_path):
    """Same platform as the release run (runtime.platform_fingerprint): the very images (by hash)
    and metrics. Elsewhere: every recorded metric within the recorded tolerance. Either way the
    command is the recorded one, so a changed default (CFG, top-k, …) cannot pass unnoticed."""
    from mindhier.runtime import platform_fingerprint

    world, ck = released
    recorded = json.loads((RELEASED / "metrics.json").read_text())["regression"]
    assert recorded["tolerance"] == REGRESSION_TOLERANCE
    again = regression_metrics(world, 1, ck, tmp_path / "regression", RECIPES["demo"])
    assert again["images"] == recorded["images"]
    assert again["pinned_command"] == recorded["pinned_command"]
    assert again["world"] == recorded["world"], "the regenerated demo world is not, byte for byte, the release's"
    for key in REGRESSION_METRICS:
        assert math.isfinite(recorded[key]), key
    if platform_fingerprint() == recorded["platform"]:
        assert again["recons_sha256"] == recorded["recons_sha256"]
        assert all(again[k] == recorded[k] for k in REGRESSION_METRICS), (again, recorded)
    else:
        for key in REGRESSION_METRICS:
            assert abs(again[key] - recorded[key]) <= REGRESSION_TOLERANCE, (key, again[key], recorded[key])


def test_the_method_stays_separated_from_its_ablations(released):
    """``mindhier ablation-check`` recorded, at release, the method's reader score over three
    seeds and that of four sampling-time ablations. Recomputed here (seed 0): on the recording
    platform the very images (by hash); anywhere, a score on the method's side of the midpoint
    between the method and every ablation it was separated from by more than seed noise, so a
    break that makes the pipeline behave like an ablation fails."""
    import torch

    from mindhier.ablation_check import draw, held_out_inputs, images_sha256, read_rates, score
    from mindhier.demo import DEFAULT_READER
    from mindhier.pipeline import Pipeline
    from mindhier.runtime import platform_fingerprint
    from mindhier.world.reader import load_reader

    record_path = RELEASED / "ablation_check.json"
    assert record_path.is_file(), "the release has no ablation_check.json: run `mindhier ablation-check`"
    recorded = json.loads(record_path.read_text())
    world, ck = released
    pipeline = Pipeline.from_checkpoints(ck["encoder"], ck["tokenizer"], ck["generator"], subject=1)
    voxels, ids, truth = held_out_inputs(world, 1, recorded["images"])
    images = draw(pipeline, pipeline.generator, voxels, ids, "method", recorded["cfg"], seed=0)
    reader, _ = load_reader(Path(__file__).resolve().parents[1] / DEFAULT_READER)
    with torch.no_grad():
        again = score(read_rates(reader, images, truth))
    seed0 = recorded["method"]["by_seed"]["0"]
    if platform_fingerprint() == recorded["platform"]:
        assert images_sha256(images) == seed0["images_sha256"]
        assert again == score(seed0["rates"])
    separated = {k: a for k, a in recorded["ablations"].items() if a["separated"]}
    assert separated, "the release is separated from none of its ablations by more than seed noise"
    for name, a in separated.items():
        midpoint = (recorded["method"]["score"] + a["score"]) / 2
        assert again > midpoint, (name, again, midpoint)


def test_the_model_cards_held_out_rows_recompute_from_the_released_files(released, tmp_path):
    """The cards' MindHier rows (every test image; single-shot and best-of-N: PixCorr, SSIM,
    CLIP-ours, EfficientNet-Lite0 two-way and distance, and the world reader's attribute rates)
    redone from the released files with the recorded command: exactly on the recording platform,
    elsewhere within ``HELD_OUT_TOLERANCE`` and the recorded 95 % intervals. The method must also
    read better than the majority guess and the ridge floor (issue 18 item 5)."""
    from mindhier.ablation_check import score
    from mindhier.demo import DEFAULT_READER
    from mindhier.demo_release import HELD_OUT_TOLERANCE, held_out_rows
    from mindhier.runtime import platform_fingerprint

    recorded = json.loads((RELEASED / "metrics.json").read_text())
    assert "held_out" in recorded, "metrics.json has no held_out record: re-release with `demo --release`"
    record = recorded["held_out"]
    assert record["tolerance"] == HELD_OUT_TOLERANCE
    world, ck = released
    reader = Path(__file__).resolve().parents[1] / DEFAULT_READER
    again = held_out_rows(world, 1, ck, tmp_path / "held_out", RECIPES["demo"], reader)
    assert again["pinned_command"] == record["pinned_command"]
    names = [name for name in recorded["reconstruction"] if name.startswith("MindHier")]
    assert len(names) >= 2 and sorted(again["reconstruction"]) == sorted(names)  # single-shot and best-of-N
    exact = platform_fingerprint() == record["platform"]
    if exact:
        assert again["recons_sha256"] == record["recons_sha256"]
    for name in names:
        for key, value in recorded["reconstruction"][name].items():
            if value is None:
                continue
            if exact:
                assert again["reconstruction"][name][key] == value, (name, key)
            else:
                assert abs(again["reconstruction"][name][key] - value) <= HELD_OUT_TOLERANCE, (name, key)
        for attribute, rate in recorded["attributes"][name].items():
            now = again["attributes"][name][attribute]["rate"]
            assert (now == rate["rate"]) if exact else (rate["low"] <= now <= rate["high"]), (name, attribute, now)
    method = score(again["attributes"]["MindHier, single-shot"])
    for floor in ("Majority class (constant guess)", "Floor: ridge voxels → pixels"):
        assert method > score(recorded["attributes"][floor]), (floor, method)
