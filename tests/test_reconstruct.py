"""`mindhier reconstruct`: output files, batch- and world-size invariance, best-of-N labelled,
and checkpoints that do not belong together refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mindhier.checkpoint import save_checkpoint
from mindhier.cli import main as cli_main
from test_train_generator import REPO, make_stack, train_args


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    stack = make_stack(tmp_path_factory.mktemp("recon"))
    out = stack["root"] / "gen"
    assert cli_main(train_args(stack, out, steps=4)) == 0
    return {**stack, "generator": out / "generator"}


def recon_args(t: dict, out: Path, *extra: str) -> list[str]:
    return ["reconstruct", "--data", str(t["world"]), "--encoder", str(t["encoder"]),
            "--tokenizer", str(t["tokenizer"]), "--generator", str(t["generator"]), "--out", str(out),
            "--limit", "5", "--top-k", "20", *extra]


def test_outputs_are_complete_and_independent_of_batch_size(trained):
    one, three = trained["root"] / "r1", trained["root"] / "r3"
    assert cli_main(recon_args(trained, one, "--candidates", "1", "--batch", "1")) == 0
    assert cli_main(recon_args(trained, three, "--candidates", "1", "--batch", "3")) == 0
    a, b = load_file(str(one / "recons.safetensors")), load_file(str(three / "recons.safetensors"))
    assert a["recons"].shape == (5, 3, 32, 32)
    assert torch.equal(a["recons"], b["recons"])
    assert 0 <= float(a["recons"].min()) and float(a["recons"].max()) <= 1
    index = a["image_index"].tolist()
    assert index == sorted(index)
    assert sorted(p.name for p in (one / "images").iterdir()) == [f"{i:06d}.png" for i in index]
    assert len(list((one / "coarse_to_fine").iterdir())) == 4
    settings = json.loads((one / "settings.json").read_text())
    assert settings["labels"] == ["single-shot"] and settings["sampling"]["num_candidates"] == 1
    assert settings["averaging"] == "voxels" and "before the encoder" in settings["averaging_note"]
    assert settings["routing"] == "scale-aware"


def encoder_inputs(monkeypatch) -> list[torch.Tensor]:
    """Every voxel batch the encoder is called on from now on (a copy), in order."""
    from mindhier.encoder import HierarchicalFMRIEncoder

    seen, forward = [], HierarchicalFMRIEncoder.forward

    def recording(self, voxels):
        seen.append(voxels.detach().clone())
        return forward(self, voxels)

    monkeypatch.setattr(HierarchicalFMRIEncoder, "forward", recording)
    return seen


def test_outputs_averaging_runs_the_encoder_on_each_repetition(trained, monkeypatch):
    """--averaging outputs feeds the encoder every repetition of every test image (MindEye2);
    the default feeds their mean (MindHier). Both are recorded, and they give other images."""
    from mindhier.data import TestSet

    repeats = TestSet(trained["world"], 1, policy="repeats")
    reps = torch.stack([repeats[i]["voxels"] for i in range(5)])                  # (5, 3, V)
    runs = {}
    for policy in ("voxels", "outputs"):
        seen = encoder_inputs(monkeypatch)
        out = trained["root"] / f"avg_{policy}"
        assert cli_main(recon_args(trained, out, "--candidates", "1", "--batch", "5", "--averaging", policy)) == 0
        fed = [v for v in seen if v.abs().sum() > 0]                               # not the null condition's zeros
        expected = reps.flatten(0, 1) if policy == "outputs" else reps.mean(1)
        assert len(fed) == 1 and torch.allclose(fed[0], expected), policy
        settings = json.loads((out / "settings.json").read_text())
        assert settings["averaging"] == policy
        runs[policy] = load_file(str(out / "recons.safetensors"))["recons"]
    assert "MindEye2" in settings["averaging_note"]
    assert not torch.equal(runs["voxels"], runs["outputs"])


def test_an_unknown_averaging_policy_is_refused(trained, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(recon_args(trained, trained["root"] / "avg_bad", "--averaging", "median"))
    assert exit_.value.code == 2
    assert "argument --averaging: invalid choice: 'median'" in capsys.readouterr().err
    assert not (trained["root"] / "avg_bad").exists()


def test_best_of_n_is_labelled_and_keeps_single_shot(trained):
    out, plain_out = trained["root"] / "r_best", trained["root"] / "r_best_plain"
    assert cli_main(recon_args(trained, out, "--candidates", "3")) == 0
    assert cli_main(recon_args(trained, plain_out, "--candidates", "1")) == 0
    best = load_file(str(out / "recons.safetensors"))
    single = load_file(str(out / "recons_single-shot.safetensors"))
    plain = load_file(str(plain_out / "recons.safetensors"))
    settings = json.loads((out / "settings.json").read_text())
    assert settings["labels"] == ["single-shot", "best-of-3"] and settings["primary"] == "best-of-3"
    assert "predicted embedding" in settings["best_of_n_ranking"]
    chosen = [settings["chosen"][str(i)] for i in best["image_index"].tolist()]
    assert len(chosen) == 5 and set(chosen) <= {0, 1, 2}
    for b, c in enumerate(chosen):   # the best image is candidate 0's exactly when candidate 0 won
        assert torch.equal(best["recons"][b], single["recons"][b]) == (c == 0), (b, c)
    assert torch.equal(plain["recons"], single["recons"])   # candidate 0 of best-of-N is the single-shot image


def test_misuse_fails_clearly(trained, capsys):
    other_tok = trained["root"] / "other_tokenizer" / "tokenizer"
    from mindhier.tokenizer import PRESETS, MultiScaleVQVAE

    save_checkpoint(other_tok, MultiScaleVQVAE(PRESETS["tiny"]).state_dict(), kind="tokenizer", config=PRESETS["tiny"])
    cases = [
        (recon_args(trained, trained["root"] / "x1", "--candidates", "1")[:6] + [str(other_tok)]
         + recon_args(trained, trained["root"] / "x1", "--candidates", "1")[7:], "is not the tokenizer"),
        (recon_args(trained, trained["root"] / "x2", "--candidates", "1", "--subject", "2"), "subject"),
        (recon_args(trained, trained["root"] / "r1", "--candidates", "1"), "exists"),
    ]
    (trained["root"] / "r1").mkdir(exist_ok=True)
    (trained["root"] / "r1" / "recons.safetensors").touch(exist_ok=True)
    capsys.readouterr()
    for args, message in cases:
        assert cli_main(args) != 0
        assert message in capsys.readouterr().err


def test_two_processes_give_the_same_images(trained):
    one, two = trained["root"] / "w1", trained["root"] / "w2"
    assert cli_main(recon_args(trained, one, "--candidates", "1", "--batch", "2")) == 0
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "mindhier",
           *recon_args(trained, two, "--candidates", "1", "--batch", "2")]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.equal(load_file(str(one / "recons.safetensors"))["recons"],
                       load_file(str(two / "recons.safetensors"))["recons"])


def test_lowlevel_blend_makes_mindhier_dagger_rows(trained, capsys):
    """`--lowlevel CKPT` (MindHier†): every set is the plain reconstruction blended with the
    low-level image of the same voxels (0.55 / 0.45 by default), settings.json says MindHier†,
    evaluate's table states it, and a table mixing MindHier and MindHier† is refused."""
    from mindhier.data import TestSet
    from mindhier.lowlevel import blend, load_lowlevel, predict

    low_out = trained["root"] / "lowlevel"
    assert cli_main(["train-lowlevel", "--data", str(trained["world"]), "--out", str(low_out), "--steps", "60",
                     "--preset", "tiny", "--batch", "16", "--warmup", "2"]) == 0
    plain, dagger = trained["root"] / "plain", trained["root"] / "dagger"
    every = ("--candidates", "2", "--coarse-to-fine", "0", "--limit", "20")  # evaluate scores all test images
    assert cli_main(recon_args(trained, plain, *every)) == 0
    assert cli_main(recon_args(trained, dagger, *every, "--lowlevel", str(low_out / "lowlevel"))) == 0
    test = TestSet(trained["world"], 1, policy="average")
    low = predict(load_lowlevel(low_out / "lowlevel")[0], torch.stack([test[i]["voxels"] for i in range(len(test))]))
    for name in ("recons.safetensors", "recons_single-shot.safetensors"):
        expected = blend(load_file(str(plain / name))["recons"], low, 0.45)
        torch.testing.assert_close(load_file(str(dagger / name))["recons"], expected, rtol=0, atol=1e-6)
    settings = json.loads((dagger / "settings.json").read_text())
    assert settings["method"] == "MindHier†" and settings["lowlevel"]["blend_weight"] == 0.45
    assert json.loads((plain / "settings.json").read_text())["method"] == "MindHier"
    assert settings["chosen"] == json.loads((plain / "settings.json").read_text())["chosen"]  # ranked unblended

    evaluate = ["evaluate", "--images", str(trained["world"]), "--force"]
    assert cli_main([*evaluate, "--recons", f"s1={dagger / 'recons.safetensors'}", "--out", str(dagger / "eval")]) == 0
    assert "MindHier† (0.55 * reconstruction + 0.45 * low-level image" in (dagger / "eval" / "metrics.md").read_text()
    mixed = [*evaluate, "--recons", f"a={plain / 'recons.safetensors'}", f"b={dagger / 'recons.safetensors'}",
             "--out", str(dagger / "mixed")]
    assert cli_main(mixed) == 2
    assert "mixes methods" in capsys.readouterr().err
    assert cli_main(recon_args(trained, trained["root"] / "w", "--blend-weight", "0.3")) == 2
    assert "--blend-weight needs --lowlevel" in capsys.readouterr().err
