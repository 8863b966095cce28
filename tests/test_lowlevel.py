"""MindHier† low-level branch: `mindhier train-lowlevel` on the tiny world, its checkpoint, and
the blend with the reconstruction (0.55 · recon + 0.45 · low-level, the official notebook)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mindhier.checkpoint import CheckpointError
from mindhier.cli import main
from mindhier.config import to_dict
from mindhier.data import ImageStore, TestSet, data_manifest
from mindhier.encoder import VoxelCountError
from mindhier.lowlevel import (PRESETS, LowLevelDecoder, LowLevelError, blend, load_lowlevel, predict,
                               upsample)
from mindhier.metrics.core import pixcorr
from mindhier.world import PRESETS as WORLD_PRESETS
from mindhier.world import generate_world

SUBJECT = 1
TRAIN = ["--subject", str(SUBJECT), "--preset", "tiny", "--batch", "32", "--warmup", "20", "--log-every", "10"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(WORLD_PRESETS["tiny"], tmp_path_factory.mktemp("lowlevel") / "tiny", show_progress=False)


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "lowlevel"
    assert main(["train-lowlevel", "--data", str(world), "--out", str(out), "--steps", "200", *TRAIN]) == 0
    return out


@pytest.fixture(scope="module")
def held_out(world):
    test = TestSet(world, SUBJECT, policy="repeats")
    repeats = torch.stack([test[i]["voxels"] for i in range(len(test))])  # (N, 3, V)
    with ImageStore(world) as store:
        stimuli = torch.from_numpy(store.get(test.image_indices))
    return repeats, stimuli


def log_losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- training and its checkpoint

def test_checkpoint_loads_and_predicts_images_in_range(trained, held_out):
    repeats, _ = held_out
    model, meta = load_lowlevel(trained / "lowlevel", num_voxels=repeats.shape[-1], subject=SUBJECT)
    averaged = predict(model, repeats.mean(1))
    assert averaged.shape == (len(repeats), 3, 8, 8)
    assert averaged.min() >= 0 and averaged.max() <= 1 and averaged.std() > 0
    # (B, R, V): the decoder reads every repetition and the R images are averaged
    per_repeat = predict(model, repeats)
    expected = torch.stack([predict(model, repeats[:, r]) for r in range(repeats.shape[1])]).mean(0)
    assert per_repeat.shape == averaged.shape
    torch.testing.assert_close(per_repeat, expected)
    assert meta["step"] == 200


def test_held_out_pixcorr_beats_the_mean_image_and_the_loss_falls(trained, held_out, world):
    repeats, stimuli = held_out
    report = json.loads((trained / "eval.json").read_text())
    assert report["policy"] == "average" and report["num_images"] == len(stimuli) == 20
    # recomputed here from the checkpoint, so eval.json cannot hold a number the model does not give
    model, _ = load_lowlevel(trained / "lowlevel")
    low = predict(model, repeats.mean(1))
    ours = pixcorr(upsample(low, stimuli.shape[-2:]), stimuli)
    assert ours == pytest.approx(report["pixcorr"], abs=1e-6)
    # an untrained decoder draws the mean training image: the baseline, measured the same way
    untrained = LowLevelDecoder(model.cfg, model.num_voxels)
    untrained.mean_logit.copy_(model.mean_logit)
    baseline = pixcorr(upsample(predict(untrained, repeats.mean(1)), stimuli.shape[-2:]), stimuli)
    assert baseline == pytest.approx(report["pixcorr_mean_image"], abs=1e-3)
    # tiny world, 3 seeds tried while choosing the preset: 0.47-0.55 against 0.37
    assert ours > baseline + 0.05, (ours, baseline)
    assert report["pixcorr_stimuli_at_size"] > ours  # nothing at 8 px beats the stimuli at 8 px
    losses = log_losses(trained)
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses


def test_metadata_records_config_manifest_commit_and_is_checked_on_load(trained, world, tmp_path):
    meta = json.loads((trained / "lowlevel.json").read_text())
    assert meta["kind"] == "lowlevel" and meta["subject"] == SUBJECT
    assert meta["config"] == to_dict(PRESETS["tiny"])
    assert meta["data_manifest"] == data_manifest(world, [SUBJECT])
    assert meta["git_commit"] and meta["num_voxels"] == TestSet(world, SUBJECT).num_voxels
    load_lowlevel(trained / "lowlevel", data_manifest=data_manifest(world, [SUBJECT]))  # the same data: accepted
    with pytest.raises(LowLevelError, match="train-lowlevel --data DIR --subject 1"):
        load_lowlevel(trained / "lowlevel", data_manifest=data_manifest(world, [2]))  # subject 2's files
    copy = tmp_path / "copy"
    shutil.copy(trained / "lowlevel.safetensors", copy.with_suffix(".safetensors"))
    del meta["data_manifest"]
    copy.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="data_manifest.*not written by `mindhier train-lowlevel`"):
        load_lowlevel(copy)


def test_wrong_voxel_count_is_refused_with_the_fix(trained, world):
    voxels = TestSet(world, 2).num_voxels
    model, meta = load_lowlevel(trained / "lowlevel")
    assert voxels != meta["num_voxels"]
    with pytest.raises(VoxelCountError, match="train-lowlevel --subject 2"):
        load_lowlevel(trained / "lowlevel", num_voxels=voxels, subject=2)
    with pytest.raises(VoxelCountError, match=f"trained on {meta['num_voxels']} voxels"):
        predict(model, torch.zeros(4, voxels))


def test_resume_continues_from_the_saved_step_exactly(world, tmp_path, capsys):
    whole, split = tmp_path / "whole", tmp_path / "split"
    run = ["train-lowlevel", "--data", str(world), "--steps", "40", "--save-every", "15", *TRAIN]
    assert main([*run, "--out", str(whole)]) == 0
    assert main([*run, "--out", str(split), "--stop-after", "25"]) == 0
    assert json.loads((split / "last.json").read_text())["step"] == 25
    assert not (split / "lowlevel.json").exists() and not (split / "eval.json").exists()
    capsys.readouterr()
    assert main([*run, "--out", str(split), "--resume"]) == 0
    assert "at step 25" in capsys.readouterr().out
    a, b = load_file(whole / "lowlevel.safetensors"), load_file(split / "lowlevel.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (split / "log.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 25, 30, 40]  # 25: where the first part stopped; nothing logged twice


def test_an_existing_run_is_not_overwritten_and_resume_checks_settings(trained, world, capsys):
    run = ["train-lowlevel", "--data", str(world), "--out", str(trained), "--steps", "200", *TRAIN]
    before = (trained / "lowlevel.safetensors").read_bytes()
    assert main(run) == 2
    assert "--resume" in capsys.readouterr().err and (trained / "lowlevel.safetensors").read_bytes() == before
    assert main([*run, "--resume", "--lr", "0.5"]) == 2
    assert "lr: saved 0.001, now 0.5" in capsys.readouterr().err


def test_paper_preset_is_the_size_the_docs_say():
    with torch.device("meta"):  # shapes only: no 81 M parameters in memory
        model = LowLevelDecoder(PRESETS["paper"], 15724)  # NSD subject 1
    assert 80e6 < sum(p.numel() for p in model.parameters()) < 82e6
    assert PRESETS["paper"].image_size == 32 and PRESETS["paper"].upsamples == 2


# ---------------------------------------------------------------- the blend

def test_blend_is_the_weighted_mix_with_the_upsampled_low_level_image():
    g = torch.Generator().manual_seed(0)
    recons, low = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    up = F.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.equal(blend(recons, low, weight=0.0), recons)
    assert torch.equal(blend(recons, low, weight=1.0), up)
    torch.testing.assert_close(blend(recons, low), 0.55 * recons + 0.45 * up)  # the default is 0.45
    # bilinear never leaves the low-level image's range (bicubic overshoots at its block edges)
    steps = torch.zeros(1, 3, 8, 8)
    steps[..., 4:] = 1
    assert F.interpolate(steps, size=(32, 32), mode="bicubic", align_corners=False).max() > 1
    assert blend(torch.zeros(1, 3, 32, 32), steps, weight=1.0).max() == 1


@pytest.mark.parametrize("weight", [-0.1, 1.5, math.nan])
def test_blend_weight_outside_0_1_is_refused_with_the_fix(weight):
    with pytest.raises(LowLevelError, match=r"pass --blend-weight between 0 and 1 \(the official notebook uses 0.45\)"):
        blend(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 8, 8), weight=weight)


def test_blend_refuses_batches_that_do_not_pair():
    with pytest.raises(LowLevelError, match="same B"):
        blend(torch.zeros(2, 3, 16, 16), torch.zeros(3, 3, 8, 8))
