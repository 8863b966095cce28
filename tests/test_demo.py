"""The whole demo on the tiny world from nothing (`--rebuild-foundation`: corpus, foundation
models, then the fMRI stages), then the released-checkpoint path."""

import json
import math
import shutil

import pytest
import torch

from mindhier import cli
from mindhier.demo import ROLES, DemoError, RECIPES, check_released_against_code, foundation_checkpoints

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    argv = ["demo", "--recipe", "tiny", "--from-scratch", "--rebuild-foundation", "--release",
            "--out", str(root / "run"), "--world", str(root / "world"), "--checkpoints", str(root / "released"),
            "--foundation", str(root / "foundation"), "--corpus", str(root / "corpus")]
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
    assert set(report["timings"]) >= {"world", "pretrain", "train encoder", "train generator", "reconstruct"}
    shown = report["attributes"]  # read by the world reader --rebuild-foundation trained
    assert {"Stimuli themselves (reader ceiling)", "Majority class (constant guess)"} <= set(shown)
    assert set(rows) <= set(shown)
    for name, rates in shown.items():
        assert set(rates) == {"main_category", "main_colour", "main_cell", "background_kind",
                              "background_colour", "present"}
        assert all(0.0 <= r["low"] <= r["rate"] <= r["high"] <= 1.0 for r in rates.values()), name
    assert "What the reconstructions show" in (run / "report.md").read_text()


def test_release_writes_model_cards_and_default_demo_uses_them(tiny_demo):
    from mindhier.checkpoint import read_metadata

    released, foundation = tiny_demo / "released", tiny_demo / "foundation"
    for stage in ("encoder", "generator"):
        card = (released / f"{stage}.md").read_text()
        assert "config hash" in card and "git commit" in card and "## Data manifest" in card
        assert f"{torch.get_num_threads()} thread(s)" in card   # the compute the time was measured on
        assert read_metadata(released / stage)["released"]["foundation"]["vision"] == str(foundation / "vision")
    for role in ("vision", "tokenizer"):  # the foundation models, byte for byte, with their cards
        for suffix in (".safetensors", ".json", ".md"):
            assert (released / f"{role}{suffix}").read_bytes() == (foundation / f"{role}{suffix}").read_bytes()
    # stage 2 fine-tuned the released pretrained generator
    gen = read_metadata(tiny_demo / "run" / "train" / "generator" / "generator")
    assert gen["init"] == str(foundation / "generator"), gen.get("init")
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

    from mindhier.demo import released_checkpoints
    from mindhier.demo_release import REGRESSION_IMAGES, regression_metrics

    run = tiny_demo / "run"
    recorded = json.loads((tiny_demo / "released" / "metrics.json").read_text())["regression"]
    ck = released_checkpoints(tiny_demo / "released", RECIPES["tiny"])
    again = regression_metrics(tiny_demo / "world", 1, ck, tmp_path / "regression", RECIPES["tiny"])
    assert len(again["images"]) == REGRESSION_IMAGES and again["images"] == recorded["images"]
    assert {k: v for k, v in again.items() if k != "command"} == {k: v for k, v in recorded.items() if k != "command"}
    assert {"clip_ours", "lite0_twoway", "recons_sha256", "platform", "pinned_command"} <= set(recorded)
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
    base = foundation_checkpoints(tiny_demo / "foundation", RECIPES["tiny"])
    train_stages(tiny_demo / "world", tiny_demo / "run" / "train", RECIPES["tiny"], 1, timer, base)
    assert capsys.readouterr().out.count("reusing") == 2


def copy_runs(tiny_demo, tmp_path):
    """The demo's training runs and foundation folder, copied, with the stage markers naming the copies."""
    runs, foundation = tmp_path / "train", tmp_path / "foundation"
    shutil.copytree(tiny_demo / "run" / "train", runs)
    shutil.copytree(tiny_demo / "foundation", foundation)
    for marker in runs.glob("*/demo_stage.json"):
        text = marker.read_text().replace(str(tiny_demo / "run" / "train"), str(runs))
        marker.write_text(text.replace(str(tiny_demo / "foundation"), str(foundation)))
    return runs, foundation


def mark_changed(path):
    meta = json.loads(path.read_text())
    meta["created"] = "another time"  # as if it had been retrained since
    path.write_text(json.dumps(meta))


def test_a_changed_foundation_model_retrains_what_depends_on_it(tiny_demo, tmp_path, capsys):
    from mindhier.demo import Timer, train_stages

    runs, foundation = copy_runs(tiny_demo, tmp_path)
    capsys.readouterr()
    train_stages(tiny_demo / "world", runs, RECIPES["tiny"], 1, Timer(), foundation_checkpoints(foundation, RECIPES["tiny"]))
    assert capsys.readouterr().out.count("reusing") == 2  # the copy itself changes nothing
    mark_changed(foundation / "generator.json")  # another pretrained generator: only stage 2 retrains
    train_stages(tiny_demo / "world", runs, RECIPES["tiny"], 1, Timer(), foundation_checkpoints(foundation, RECIPES["tiny"]))
    out = capsys.readouterr().out
    assert "encoder: reusing" in out and "generator: reusing" not in out
    mark_changed(foundation / "vision.json")  # another vision model: the encoder, hence stage 2 too
    train_stages(tiny_demo / "world", runs, RECIPES["tiny"], 1, Timer(), foundation_checkpoints(foundation, RECIPES["tiny"]))
    out = capsys.readouterr().out
    assert "reusing" not in out and "encoder: " in out


def test_missing_foundation_and_flag_misuse_are_refused_with_the_fix(tiny_demo, tmp_path):
    with pytest.raises(DemoError, match="mindhier pretrain --recipe tiny --release"):
        foundation_checkpoints(tmp_path / "nothing", RECIPES["tiny"])
    argv = ["demo", "--recipe", "tiny", "--rebuild-foundation", "--out", str(tmp_path / "run"),
            "--world", str(tiny_demo / "world")]
    assert cli.main(argv) == 2


def test_stale_released_checkpoint_is_refused_with_retrain_hint(tiny_demo, tmp_path):
    folder = tmp_path / "released"
    shutil.copytree(tiny_demo / "released", folder)
    meta = json.loads((folder / "tokenizer.json").read_text())
    meta["config"]["vocab_size"] += 1
    (folder / "tokenizer.json").write_text(json.dumps(meta))
    ck = {s: folder / s for s in ROLES}
    with pytest.raises(DemoError, match="vocab_size.*\n.*--from-scratch|--from-scratch"):
        check_released_against_code(ck, RECIPES["tiny"])


def test_without_released_checkpoints_the_demo_stops_after_the_world_and_says_how(tmp_path, capsys):
    argv = ["demo", "--recipe", "tiny", "--out", str(tmp_path / "run"), "--world", str(tmp_path / "world"),
            "--checkpoints", str(tmp_path / "none")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "world 'tiny'" in out and "--from-scratch" in out
    assert (tmp_path / "world" / "world" / "world.json").is_file()
    assert not (tmp_path / "run" / "report.html").exists()


def test_a_non_empty_world_folder_is_refused_with_demo_flags_only(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    argv = ["demo", "--recipe", "tiny", "--out", str(tmp_path / "run"), "--world", str(folder)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--world another folder" in err and "--force" not in err
    assert (folder / "notes.txt").read_text() == "keep me"


def test_release_leaves_no_stale_file_and_copies_foundation_unchanged(tiny_demo, tmp_path):
    from mindhier.demo_release import release

    folder = tmp_path / "released"
    shutil.copytree(tiny_demo / "released", folder)
    (folder / "old_encoder.safetensors").write_bytes(b"stale")  # e.g. a stage an older recipe had
    ck = {"vision": tiny_demo / "foundation" / "vision", "tokenizer": tiny_demo / "foundation" / "tokenizer",
          "encoder": tiny_demo / "run" / "train" / "encoder" / "encoder",
          "generator": tiny_demo / "run" / "train" / "generator" / "generator"}
    release(ck, folder)
    expected = [f"{role}{suffix}" for role in ROLES for suffix in (".safetensors", ".json")]
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected + ["tokenizer.md", "vision.md"])


def test_an_interrupted_stage_is_resumed_not_restarted(tiny_demo, tmp_path, capsys):
    from mindhier.demo import Timer, train_stages

    runs, foundation = copy_runs(tiny_demo, tmp_path)
    shutil.rmtree(runs / "generator")
    base = foundation_checkpoints(foundation, RECIPES["tiny"])
    half = ["train-generator", *fmri_command(tiny_demo, runs, base)[1:], "--stop-after", "10"]
    assert cli.main(half) == 0  # a job killed after 10 of its 30 steps leaves its last checkpoint
    capsys.readouterr()
    train_stages(tiny_demo / "world", runs, RECIPES["tiny"], 1, Timer(), base)
    out = capsys.readouterr().out
    assert "encoder: reusing" in out and "--resume" in out and "resumed" in out and "at step 10" in out


def fmri_command(tiny_demo, runs, base):
    from mindhier.demo import fmri_stage_commands

    return fmri_stage_commands(tiny_demo / "world", runs, RECIPES["tiny"], 1, base)[0]["generator"]
