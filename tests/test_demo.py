"""The whole from-scratch demo on the tiny world, then the released-checkpoint path."""

import json
import math

import pytest
import torch

from mindhier import cli
from mindhier.demo import DemoError, RECIPES, check_released_against_code

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    argv = ["demo", "--recipe", "tiny", "--from-scratch", "--release", "--out", str(root / "run"),
            "--world", str(root / "world"), "--checkpoints", str(root / "released")]
    assert cli.main(argv) == 0
    return root


def test_report_files_and_metrics_in_range(tiny_demo):
    run = tiny_demo / "run"
    for name in ("report.html", "report.md", "report.json", "reconstructions.png", "coarse_to_fine_0.png"):
        assert (run / name).is_file(), name
    assert (run / "reconstruct" / "recons.safetensors").is_file()
    report = json.loads((run / "report.json").read_text())
    rows = report["metrics"]
    assert {"Ceiling: tokenizer reconstruction", "Floor: ridge voxels → pixels"} <= set(rows)
    assert any(name.startswith("MindHier") for name in rows)
    for name, values in rows.items():
        for key in ("pixcorr", "ssim", "clip_ours", "lite0_twoway", "lite0_dist"):
            v = values[key]
            assert v is not None and math.isfinite(v), (name, key)
            low, high = (-1, 1) if key in ("pixcorr", "ssim") else (0, 2)
            assert low <= v <= high, (name, key, v)
    assert set(report["timings"]) >= {"world", "train vision", "train encoder", "train tokenizer",
                                       "train generator", "reconstruct"}
    shown = report["attributes"]
    assert {"Stimuli themselves (probe ceiling)", "Majority class (constant guess)"} <= set(shown)
    assert set(rows) <= set(shown)
    for name, rates in shown.items():
        assert set(rates) == {"main_category", "main_colour", "background_kind", "background_colour", "colours_both"}
        assert all(0.0 <= v <= 1.0 for v in rates.values()), name
    assert "What the reconstructions show" in (run / "report.md").read_text()


def test_release_writes_model_cards_and_default_demo_uses_them(tiny_demo):
    released = tiny_demo / "released"
    for stage in ("vision", "encoder", "tokenizer", "generator"):
        assert (released / f"{stage}.safetensors").is_file()
        card = (released / f"{stage}.md").read_text()
        assert "config hash" in card and "git commit" in card and "## Data manifest" in card
    argv = ["demo", "--recipe", "tiny", "--out", str(tiny_demo / "again"), "--world",
            str(tiny_demo / "world"), "--checkpoints", str(released)]
    assert cli.main(argv) == 0
    assert (tiny_demo / "again" / "report.html").is_file()


def test_released_regression_subset_reproduces_its_recorded_images_exactly(tiny_demo, tmp_path):
    """Same software, same machine, so no tolerance: a fresh regression run on the released
    weights gives bit for bit the images the release run recorded, and those are the report's
    own single-shot reconstructions of the same test images (a run with other batching and two
    candidates per image), as seeding per (seed, image, candidate) promises."""
    from safetensors.torch import load_file

    from mindhier.demo import REGRESSION_IMAGES, regression_metrics, released_checkpoints

    run = tiny_demo / "run"
    recorded = json.loads((tiny_demo / "released" / "metrics.json").read_text())["regression"]
    ck = released_checkpoints(tiny_demo / "released", "tiny")
    again = regression_metrics(tiny_demo / "world", 1, ck, tmp_path / "regression", RECIPES["tiny"])
    assert len(again["images"]) == REGRESSION_IMAGES and again["images"] == recorded["images"]
    assert (again["pixcorr"], again["ssim"]) == (recorded["pixcorr"], recorded["ssim"])
    fresh = load_file(str(tmp_path / "regression" / "recons.safetensors"))
    at_release = load_file(str(run / "regression" / "recons.safetensors"))
    assert torch.equal(fresh["image_index"], at_release["image_index"])
    assert torch.equal(fresh["recons"], at_release["recons"])
    report = load_file(str(run / "reconstruct" / "recons_single-shot.safetensors"))
    rows = [report["image_index"].tolist().index(i) for i in recorded["images"]]
    assert torch.equal(fresh["recons"], report["recons"][rows])


def test_from_scratch_rerun_reuses_finished_stages(tiny_demo, capsys):
    from mindhier.demo import Timer, train_stages

    timer = Timer()
    train_stages(tiny_demo / "world", tiny_demo / "run" / "train", RECIPES["tiny"], 1, timer)
    assert capsys.readouterr().out.count("reusing") == 4


def test_a_changed_upstream_checkpoint_retrains_what_depends_on_it(tiny_demo, tmp_path, capsys):
    import shutil

    from mindhier.demo import Timer, train_stages

    runs = tmp_path / "train"
    shutil.copytree(tiny_demo / "run" / "train", runs)
    for marker in runs.glob("*/demo_stage.json"):  # the copy's commands name the copy's folders
        marker.write_text(marker.read_text().replace(str(tiny_demo / "run" / "train"), str(runs)))
    meta_path = runs / "vision" / "vision.json"
    meta = json.loads(meta_path.read_text())
    meta["created"] = "another time"  # as if vision had been retrained since
    meta_path.write_text(json.dumps(meta))
    capsys.readouterr()
    train_stages(tiny_demo / "world", runs, RECIPES["tiny"], 1, Timer())
    out = capsys.readouterr().out
    assert "vision: reusing" in out and "tokenizer: reusing" in out
    assert "encoder: " in out and "encoder: reusing" not in out
    assert "generator: reusing" not in out


def test_stale_released_checkpoint_is_refused_with_retrain_hint(tiny_demo, tmp_path):
    import shutil

    folder = tmp_path / "released"
    shutil.copytree(tiny_demo / "released", folder)
    meta = json.loads((folder / "tokenizer.json").read_text())
    meta["config"]["vocab_size"] += 1
    (folder / "tokenizer.json").write_text(json.dumps(meta))
    ck = {s: folder / s for s in ("vision", "encoder", "tokenizer", "generator")}
    with pytest.raises(DemoError, match="vocab_size.*\n.*--from-scratch|--from-scratch"):
        check_released_against_code(ck, "tiny")


def test_without_released_checkpoints_the_demo_stops_after_the_world_and_says_how(tmp_path, capsys):
    argv = ["demo", "--recipe", "tiny", "--out", str(tmp_path / "run"), "--world", str(tmp_path / "world"),
            "--checkpoints", str(tmp_path / "none")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "world 'tiny'" in out and "--from-scratch" in out
    assert (tmp_path / "world" / "world" / "world.json").is_file()
    assert not (tmp_path / "run" / "report.html").exists()
