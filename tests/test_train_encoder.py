"""`mindhier train-encoder` end to end on a small data folder it builds itself: loss falls,
exact resume, 2-process DDP matches one process, and bad inputs fail clearly."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mindhier.cli import main as cli_main
from mindhier.data import layout
from mindhier.encoder import VoxelCountError, load_encoder
from mindhier.vision import scaled_layer_map
from mindhier.vision.small_clip import PRESETS as CLIP_PRESETS
from mindhier.vision.small_clip import SmallClipModel, build_vocab, resolve_config, save_small_clip

SUBJECT, IMAGE_SIZE = 1, 32
N_TRAIN, N_TEST, REPEATS = 96, 12, 3
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("disc", "square", "star")


# ---- a small data folder in MindEye2 layout + a random tiny small-CLIP ---------------------


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _write_tar(path: Path, rows: list[tuple[int, int, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for image, trial, shared in rows:
            behav = -np.ones((1, layout.BEHAV_COLUMNS))
            behav[0, layout.COL_IMAGE], behav[0, layout.COL_TRIAL], behav[0, layout.COL_SHARED] = image, trial, shared
            data = _npy(behav)
            info = tarfile.TarInfo(f"sample{trial:09d}.behav.npy")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_data(root: Path, voxels: int = 64, nan_row: int | None = None, seed: int = 0) -> Path:
    """Images with a colour/brightness structure, voxels a noisy nonlinear readout of them."""
    rng = np.random.default_rng(seed)
    n_images = N_TRAIN + N_TEST
    colour = rng.random((n_images, 3, 1, 1))
    ramp = np.linspace(0, 1, IMAGE_SIZE)[None, None, :, None] * rng.random((n_images, 1, 1, 1))
    images = np.clip(0.6 * colour + 0.4 * ramp + 0.05 * rng.random((n_images, 3, IMAGE_SIZE, IMAGE_SIZE)), 0, 1)
    root.mkdir(parents=True, exist_ok=True)
    with h5py.File(layout.images_hdf5_path(root), "w") as f:
        f.create_dataset("images", data=images.astype(np.float16))
    captions = np.array([[f"a {COLOURS[i % 4]} {SHAPES[(i // 4) % 3]} number {k}" for k in range(5)]
                         for i in range(n_images)])
    np.save(layout.captions_path(root), captions)
    pooled = images.reshape(n_images, 3, 4, 8, 4, 8).mean((3, 5)).reshape(n_images, -1)  # 48 features
    readout = rng.normal(size=(pooled.shape[1], voxels)) / np.sqrt(pooled.shape[1])
    signal = np.tanh(3 * (pooled - pooled.mean(0)) @ readout)
    test_images = np.arange(N_TRAIN, n_images)
    trial_images = np.concatenate([np.arange(N_TRAIN), np.repeat(test_images, REPEATS)])
    betas = signal[trial_images] + 0.3 * rng.normal(size=(len(trial_images), voxels))
    betas = ((betas - betas.mean(0)) / betas.std(0)).astype(np.float32)
    if nan_row is not None:
        betas[nan_row, 3] = np.nan
    with h5py.File(layout.betas_path(root, SUBJECT), "w") as f:
        f.create_dataset("betas", data=betas)
    half = N_TRAIN // 2
    for session, trials in enumerate((range(0, half), range(half, N_TRAIN))):
        _write_tar(layout.train_tar_path(root, SUBJECT, session), [(t, t, 0) for t in trials])
    test_rows = range(N_TRAIN, len(trial_images))
    _write_tar(layout.test_tar_path(root, SUBJECT), [(int(trial_images[t]), t, 1) for t in test_rows])
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("train_encoder")
    data = make_data(base / "data")
    torch.manual_seed(0)
    vocab = build_vocab(np.load(layout.captions_path(data)).ravel().tolist())
    clip = SmallClipModel(resolve_config(CLIP_PRESETS["tiny"], vocab))
    save_small_clip(base / "vision" / "vision", clip, vocab)
    return base, data, base / "vision"


def cli(setup, out, *extra) -> int:
    base, data, vision = setup
    return cli_main(["train-encoder", "--data", str(data), "--vision", str(vision), "--out", str(out),
                     "--preset", "tiny", "--global-batch", "16", "--epochs", "2", "--lr", "3e-3",
                     "--precision", "fp32", "--target-cache", str(base / "targets"), *extra])


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def read_log(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


# ---- training --------------------------------------------------------------------------------


def test_loss_falls_and_checkpoint_is_complete(setup, tmp_path):
    out = tmp_path / "run"
    assert cli(setup, out, "--epochs", "6") == 0
    history = metrics(out)
    assert len(history) == 6
    assert history[-1]["train"]["loss"] < 0.8 * history[0]["train"]["loss"]
    scores = history[-1]["test"]
    assert scores["n_test"] == N_TEST and 0 <= scores["top1"] <= 1 and 0 <= scores["two_way"] <= 1
    assert {f"cosine_e{m}" for m in range(1, 5)} <= set(scores)
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["kind"] == "encoder" and meta["subject"] == SUBJECT and meta["num_voxels"] == 64
    assert meta["nsd_sessions"] == [1, 2] and meta["train"]["nsd_sessions"] is None and meta["init"] is None
    assert meta["train"]["averaging"] == "voxels" and meta["data_manifest"]["sessions"] == [1, 2]
    depth = CLIP_PRESETS["tiny"].layers
    assert meta["vision"]["layers"] == list(scaled_layer_map("balanced", depth))
    assert meta["vision"]["final_layer"] == depth
    assert meta["progress"]["step"] == 6 * (N_TRAIN // 16)
    assert meta["data_manifest"]["subjects"] == [SUBJECT] and meta["git_commit"]
    model, _ = load_encoder(out / "encoder", num_voxels=64, subject=SUBJECT)
    assert model.num_voxels == 64 and not model.training
    # an existing run is never overwritten silently
    assert cli(setup, out) == 2


def mark_metrics(out: Path) -> None:
    """Tag the records written so far, to tell them apart from those a later invocation writes."""
    records = metrics(out)
    (out / "metrics.jsonl").write_text("".join(json.dumps({**r, "earlier": True}) + "\n" for r in records))


def perturb_weights(checkpoint: Path) -> None:
    """Scale the saved model weights by 1.05 (optimizer and RNG state untouched)."""
    with safe_open(str(checkpoint), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(checkpoint)
    save_file({k: v * 1.05 if k.endswith("weight") and not k.startswith("optim.") else v
               for k, v in tensors.items()}, str(checkpoint), metadata=metadata)


def test_interrupted_run_resumes_exactly(setup, tmp_path, capsys):
    """Default (hierarchical) supervision, 6 steps per epoch: stop mid-epoch 1 (step 4), again
    mid-epoch 2 (step 9), then finish; the result is bit for bit the uninterrupted run's. A
    fresh run is deterministic too, so the test also checks that each resumed invocation starts
    where the last one stopped and that the result follows the saved weights."""
    straight, resumed, perturbed = tmp_path / "straight", tmp_path / "resumed", tmp_path / "perturbed"
    assert cli(setup, straight) == 0
    assert cli(setup, resumed, "--stop-after", "4") == 0
    assert json.loads((resumed / "encoder.json").read_text())["progress"]["step"] == 4
    shutil.copytree(resumed, perturbed)
    capsys.readouterr()
    assert cli(setup, resumed, "--resume", "--stop-after", "5") == 0
    assert "at step 4/12" in capsys.readouterr().out
    assert json.loads((resumed / "encoder.json").read_text())["progress"]["step"] == 9
    assert [r["epoch"] for r in metrics(resumed)] == [1]   # this invocation ended epoch 1
    mark_metrics(resumed)
    assert cli(setup, resumed, "--resume") == 0
    assert "at step 9/12" in capsys.readouterr().out
    a, b = metrics(straight), metrics(resumed)
    assert [(r["epoch"], r.get("earlier", False)) for r in b] == [(1, True), (2, False)]
    for ra, rb in zip(a, b):
        assert rb["train"]["loss"] == pytest.approx(ra["train"]["loss"], abs=1e-6)
        assert rb["test"] == ra["test"]
    wa, wb = load_file(straight / "encoder.safetensors"), load_file(resumed / "encoder.safetensors")
    for key in wa:
        if not key.startswith("rng."):
            torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=0, msg=key)

    perturb_weights(perturbed / "encoder.safetensors")
    assert cli(setup, perturbed, "--resume") == 0
    assert metrics(perturbed)[0]["train"]["loss"] != a[0]["train"]["loss"]   # steps 5-6 ran on the saved weights
    wc = load_file(perturbed / "encoder.safetensors")
    assert not all(torch.equal(wa[key], wc[key]) for key in wa if not key.startswith("rng."))


def test_single_feature_trains_exactly_like_final_only(setup, tmp_path):
    """"single" differs from "final-only" only in what the encoder hands on (e_M at every level),
    so with the same seed the two optimisations are the same, weight for weight."""
    assert cli(setup, tmp_path / "final", "--supervision", "final-only", "--epochs", "1") == 0
    assert cli(setup, tmp_path / "single", "--supervision", "single", "--epochs", "1") == 0
    wf, ws = load_file(tmp_path / "final" / "encoder.safetensors"), load_file(tmp_path / "single" / "encoder.safetensors")
    for key in wf:
        torch.testing.assert_close(ws[key], wf[key], rtol=0, atol=0, msg=key)
    single = metrics(tmp_path / "single")[0]["test"]
    assert single["cosine_e1"] != metrics(tmp_path / "final")[0]["test"]["cosine_e1"]  # e_M read at level 1


def test_resume_refuses_other_settings(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(setup, out, "--stop-after", "1") == 0
    assert cli(setup, out, "--resume", "--lr", "1e-3") == 2
    assert "lr: expected 0.001, checkpoint has 0.003" in capsys.readouterr().err
    assert cli(setup, out, "--resume", "--preset", "demo") == 2
    assert "mlp_hidden" in capsys.readouterr().err


# ---- caption rule and text-loss weight ------------------------------------------------------


def make_trainer(setup, out: Path, *extra: str):
    from mindhier.train import encoder as trainer
    from mindhier.train.distributed import distributed_session

    base, data, vision = setup
    parser = trainer.argparse.ArgumentParser()
    trainer.add_arguments(parser)
    args = parser.parse_args(["--data", str(data), "--vision", str(vision), "--out", str(out), "--preset", "tiny",
                              "--global-batch", "16", "--target-cache", str(base / "targets"), "--device", "cpu",
                              *extra])
    with distributed_session("cpu") as d:
        return trainer.Trainer(args, d)


def test_text_target_rotates_over_the_captions_by_step(setup, tmp_path):
    """--captions rotate (default): step k of an epoch encodes caption k % 3 of every image of
    the step (the official prompts[train_i % 3]); --captions fixed: caption (image index) % 3."""
    from mindhier.data import caption_for
    from mindhier.vision import load_vision

    _, data, vision_dir = setup
    vision = load_vision(vision_dir).freeze()
    captions = np.load(layout.captions_path(data))
    images = np.array([0, 5, 7, 42])

    def expected(variant_of) -> torch.Tensor:
        texts = [caption_for(captions, int(i), variant_of(int(i))) for i in images]
        return vision.text_targets(texts)[0].half().float()  # the caches hold fp16

    rotate = make_trainer(setup, tmp_path / "rotate")
    got = [rotate._targets(images, k)["text"] for k in range(7)]
    for k, text in enumerate(got):
        torch.testing.assert_close(text, expected(lambda i, k=k: k % 3), rtol=1e-3, atol=2e-3)
    assert torch.equal(got[0], got[3]) and torch.equal(got[1], got[4]) and torch.equal(got[0], got[6])
    assert not torch.equal(got[0], got[1]) and not torch.equal(got[1], got[2])
    fixed = make_trainer(setup, tmp_path / "fixed", "--captions", "fixed")
    for k in range(3):
        torch.testing.assert_close(fixed._targets(images, k)["text"], expected(lambda i: i % 3), rtol=1e-3, atol=2e-3)
    other = {k: v for k, v in rotate._targets(images, 1).items() if k != "text"}
    assert all(torch.equal(v, fixed._targets(images, 1)[k]) for k, v in other.items())  # vision targets alike


def test_caption_rule_and_text_weight_are_recorded_and_checked_on_resume(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(setup, out, "--stop-after", "1", "--text-mse-weight", "2.5") == 0
    train = json.loads((out / "encoder.json").read_text())["train"]
    assert train["captions"] == "rotate" and train["loss"] == {"text_mse_weight": 2.5}
    capsys.readouterr()
    assert cli(setup, out, "--resume", "--stop-after", "1") == 2
    assert "loss.text_mse_weight: expected 1.0, checkpoint has 2.5" in capsys.readouterr().err
    assert cli(setup, out, "--resume", "--stop-after", "1", "--text-mse-weight", "2.5", "--captions", "fixed") == 2
    assert "captions: expected 'fixed', checkpoint has 'rotate'" in capsys.readouterr().err
    assert cli(setup, out, "--resume", "--stop-after", "1", "--text-mse-weight", "2.5") == 0


def test_runs_from_before_these_settings_resume_as_they_were_trained(setup, tmp_path, capsys):
    """A checkpoint without ``captions``/``loss`` trained with the fixed caption and unit weight."""
    out = tmp_path / "old"
    assert cli(setup, out, "--stop-after", "1", "--captions", "fixed") == 0
    meta_path = out / "encoder.json"
    meta = json.loads(meta_path.read_text())
    del meta["train"]["captions"], meta["train"]["loss"]
    meta_path.write_text(json.dumps(meta))
    capsys.readouterr()
    assert cli(setup, out, "--resume", "--stop-after", "1") == 2  # the new default is another run
    assert "captions: expected 'rotate', checkpoint has 'fixed'" in capsys.readouterr().err
    assert cli(setup, out, "--resume", "--stop-after", "1", "--captions", "fixed") == 0


# ---- sessions and the test set's averaging policy -------------------------------------------


def test_sessions_train_on_exactly_their_trials_and_are_recorded(setup, tmp_path, capsys):
    """make_data puts trials 0-47 in train/0.tar (session 1) and 48-95 in train/1.tar (session 2)."""
    half = N_TRAIN // 2
    trainer = make_trainer(setup, tmp_path / "t", "--sessions", "2")
    assert sorted(trainer.train.trials) == list(range(half, N_TRAIN)) and len(trainer.test) == N_TEST
    out = tmp_path / "two"
    assert cli(setup, out, "--sessions", "2", "--epochs", "1") == 0
    assert f"{half} trials of sessions 2," in capsys.readouterr().out
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["progress"]["step"] == half // 16                     # an epoch is every trial of session 2 once
    assert meta["nsd_sessions"] == [2] and meta["train"]["nsd_sessions"] == [2]
    assert meta["data_manifest"]["sessions"] == [2]
    assert cli(setup, out, "--resume", "--sessions", "1") == 2       # other sessions: another experiment
    assert "nsd_sessions: expected [1], checkpoint has [2]" in capsys.readouterr().err
    assert cli(setup, tmp_path / "x", "--sessions", "3") == 2
    assert "subject 1 in" in (err := capsys.readouterr().err) and "has no session 3; it holds sessions 1-2" in err
    assert cli(setup, tmp_path / "x", "--sessions", "0") == 2
    assert "numbered from 1, as NSD numbers them" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_runs_from_before_nsd_numbering_resume_on_their_sessions(setup, tmp_path, capsys):
    """train-encoder used to record --sessions as 0-based train tar numbers (``sessions``)."""
    out = tmp_path / "old"
    assert cli(setup, out, "--sessions", "1", "--stop-after", "1") == 0
    meta_path = out / "encoder.json"
    meta = json.loads(meta_path.read_text())
    del meta["train"]["nsd_sessions"], meta["train"]["averaging"], meta["train"]["init"], meta["nsd_sessions"]
    meta["train"]["sessions"], meta["sessions"] = [0], [0]
    meta_path.write_text(json.dumps(meta))
    capsys.readouterr()
    assert cli(setup, out, "--resume", "--stop-after", "1", "--sessions", "2") == 2
    assert "nsd_sessions: expected [2], checkpoint has [1]" in capsys.readouterr().err
    assert cli(setup, out, "--resume", "--stop-after", "1", "--sessions", "1") == 0


def test_outputs_averaging_scores_each_repetition_and_is_recorded(setup, tmp_path, capsys):
    """The same training, held-out scores from averaged voxels or from averaged encoder outputs."""
    runs = {policy: tmp_path / policy for policy in ("voxels", "outputs")}
    for policy, out in runs.items():
        assert cli(setup, out, "--epochs", "1", "--averaging", policy) == 0
    assert read_log(runs["voxels"]) == read_log(runs["outputs"])        # the policy never touches training
    scores = {policy: metrics(out)[0]["test"] for policy, out in runs.items()}
    assert scores["voxels"]["n_test"] == scores["outputs"]["n_test"] == N_TEST
    assert scores["voxels"]["cosine_e1"] != scores["outputs"]["cosine_e1"]
    assert json.loads((runs["outputs"] / "encoder.json").read_text())["train"]["averaging"] == "outputs"
    assert "(outputs averaged)" in capsys.readouterr().out
    assert cli(setup, runs["outputs"], "--resume", "--epochs", "2") == 2   # resumed with the default policy
    assert "averaging: expected 'voxels', checkpoint has 'outputs'" in capsys.readouterr().err


# ---- bad inputs ------------------------------------------------------------------------------


def test_voxel_count_mismatch_with_checkpoint(setup, tmp_path, capsys):
    base, _, vision = setup
    out = tmp_path / "run"
    assert cli(setup, out, "--stop-after", "1") == 0
    with pytest.raises(VoxelCountError, match=r"64 voxels \(subject 1\).*subject 1 has 70 voxels"):
        load_encoder(out / "encoder", num_voxels=70, subject=1)
    other = make_data(tmp_path / "other", voxels=70)
    capsys.readouterr()
    rc = cli_main(["train-encoder", "--data", str(other), "--vision", str(vision), "--out", str(out),
                   "--preset", "tiny", "--global-batch", "16", "--epochs", "2", "--lr", "3e-3",
                   "--precision", "fp32", "--target-cache", str(base / "targets"), "--resume"])
    assert rc == 2
    assert "trained on 64 voxels" in capsys.readouterr().err


def test_nan_voxels_are_a_clear_error(setup, tmp_path, capsys):
    base, _, vision = setup
    bad = make_data(tmp_path / "bad", nan_row=5)
    rc = cli_main(["train-encoder", "--data", str(bad), "--vision", str(vision), "--out", str(tmp_path / "run"),
                   "--preset", "tiny", "--global-batch", "16", "--target-cache", str(base / "targets")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "row 5" in err and "NaN" in err


def test_non_finite_loss_skips_steps_then_stops(setup, tmp_path, monkeypatch, capsys):
    import mindhier.train.encoder as trainer

    real, calls = trainer.encoder_loss, []

    def flaky(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), parts) if len(calls) <= 2 else (loss, parts)

    monkeypatch.setattr(trainer, "encoder_loss", flaky)
    out = tmp_path / "run"
    assert cli(setup, out, "--epochs", "1") == 0
    first = metrics(out)[0]["train"]
    assert first["skipped"] == 2 and np.isfinite(first["loss"])
    monkeypatch.setattr(trainer, "encoder_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), {}))
    capsys.readouterr()
    assert cli(setup, tmp_path / "run2", "--epochs", "1") == 2  # a clear message, not a traceback
    assert "not finite for 5 steps in a row" in capsys.readouterr().err


def test_missing_vision_model_is_a_clear_error(setup, tmp_path, capsys):
    _, data, _ = setup
    rc = cli_main(["train-encoder", "--data", str(data), "--vision", str(tmp_path / "nope"),
                   "--out", str(tmp_path / "run"), "--preset", "tiny"])
    assert rc == 2 and "train-vision" in capsys.readouterr().err


# ---- two processes ---------------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import os, sys
    import torch
    from safetensors.torch import save_file
    from mindhier.train import encoder
    from mindhier.train.distributed import init_distributed, shutdown
    parser = encoder.argparse.ArgumentParser()
    encoder.add_arguments(parser)
    args = parser.parse_args(sys.argv[1:])
    d = init_distributed("cpu")
    trainer = encoder.Trainer(args, d)
    trainer.fit()
    state = {k: v.detach().clone().contiguous() for k, v in trainer.model.state_dict().items()}
    save_file(state, os.path.join(args.out, f"rank{d.rank}.safetensors"))
    shutdown(d)
""")


def one_process_as_two_ranks(setup, out: Path, *extra: str) -> None:
    """The 1-process reference for a 2-process run: it accumulates, step by step, exactly the
    micro batches the 2 ranks hold (SoftCLIP's negatives are the other samples of a micro batch,
    so the partition of the global batch, not only its samples, must be the same)."""
    from mindhier.train import encoder as trainer
    from mindhier.train.distributed import distributed_session

    class AsTwoRanks(trainer.Trainer):
        def _batches(self, epoch):
            order = np.concatenate(super()._batches(epoch))         # the shuffled epoch, as 1 process reads it
            per_step = order.reshape(self.steps_per_epoch, self.micro, 2)   # rank r reads every 2nd sample from r
            return list(per_step.transpose(0, 2, 1).reshape(-1, self.micro))

    base, data, vision = setup
    parser = trainer.argparse.ArgumentParser()
    trainer.add_arguments(parser)
    args = parser.parse_args(["--data", str(data), "--vision", str(vision), "--out", str(out), *extra,
                              "--target-cache", str(base / "targets"), "--device", "cpu", "--max-micro-batch", "8"])
    with distributed_session("cpu") as d:
        trainer_ = AsTwoRanks(args, d)
        assert (trainer_.micro, trainer_.accum) == (8, 2)
        trainer_.fit()


def test_two_gloo_processes_match_one(setup, tmp_path):
    """One epoch on 2 gloo processes against one process on the same micro batches: the same
    losses, weights and Adam moments (exp_avg and exp_avg_sq carry the gradients' scale, which
    Adam's steps do not: summed instead of averaged gradients change the moments, not the
    weights), and the ranks' parameters identical."""
    base, data, vision = setup
    common = ["--preset", "tiny", "--global-batch", "16", "--epochs", "1", "--lr", "3e-3", "--precision", "fp32"]
    one_process_as_two_ranks(setup, tmp_path / "one", *common)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "--data", str(data), "--vision", str(vision), "--out", str(out), *common,
           "--target-cache", str(base / "targets"), "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) x 8 x 1 accum" in proc.stdout
    r0, r1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert r0.keys() == r1.keys()
    for key in r0:
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=0, msg=key)

    one, two = load_file(tmp_path / "one" / "encoder.safetensors"), load_file(out / "encoder.safetensors")
    compared = [k for k in one if not k.startswith("rng.")]
    assert set(compared) <= set(two)
    assert sum(k.endswith(".exp_avg") for k in compared) == sum(k.endswith(".exp_avg_sq") for k in compared) > 0
    for key in compared:
        scale = one[key].abs().max().clamp_min(1e-12)
        assert (one[key] - two[key]).abs().max() / scale < 1e-4, key
    torch.testing.assert_close(two["fmri_pos"], r0["fmri_pos"], rtol=0, atol=0)
    assert metrics(out)[0]["train"]["loss"] == pytest.approx(metrics(tmp_path / "one")[0]["train"]["loss"], rel=1e-5)
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["progress"]["world_size"] == 2 and meta["progress"]["step"] == N_TRAIN // 16
    assert {"rng.rank0.cpu", "rng.rank1.cpu"} <= set(two)
    assert len(metrics(out)) == 1  # rank 0 alone evaluates and logs


def test_the_recipe_fills_the_schedule_and_is_recorded_with_its_sources(setup, tmp_path):
    """--recipe paper: the schedule flags left out take appendix E's / the official code's values,
    the ones given win, and the checkpoint says which came from where (mindhier.train.recipes)."""
    out = tmp_path / "run"
    assert cli(setup, out, "--stop-after", "1", "--recipe", "paper") == 0
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["recipe"]["name"] == "paper"
    assert meta["train"]["epochs"] == 2 and meta["recipe"]["sources"]["epochs"] == "command line"
    assert meta["train"]["weight_decay"] == 0.01 and meta["train"]["warmup"] == pytest.approx(2 / 300)
    assert meta["recipe"]["sources"]["warmup"].startswith("recipe paper: official brainencoder/train.py")
