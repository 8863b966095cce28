"""`mindhier train-generator` end to end on a tiny world with random frozen models: the loss
falls, resume is exact, 1 process and 2 processes (FSDP2 and DDP on gloo) compute the same
gradients, and misuse fails clearly."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mindhier.checkpoint import save_checkpoint
from mindhier.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


def make_stack(root: Path) -> dict:
    """A tiny world + random tiny small-CLIP, encoder and tokenizer checkpoints (seconds)."""
    from mindhier.data import TrainTrials, layout
    from mindhier.encoder import PRESETS as ENC
    from mindhier.encoder import HierarchicalFMRIEncoder, VisionShape
    from mindhier.tokenizer import PRESETS as TOK
    from mindhier.tokenizer import MultiScaleVQVAE
    from mindhier.vision import load_vision
    from mindhier.vision.small_clip import PRESETS as CLIP
    from mindhier.vision.small_clip import SmallClipModel, build_vocab, resolve_config, save_small_clip
    from mindhier.world import PRESETS as WORLD
    from mindhier.world import generate_world

    world = root / "world"
    generate_world(WORLD["tiny"], world)
    torch.manual_seed(0)
    vocab = build_vocab(np.load(layout.captions_path(world)).ravel().tolist())
    save_small_clip(root / "vision" / "vision", SmallClipModel(resolve_config(CLIP["tiny"], vocab)), vocab)
    shape = VisionShape.of(load_vision(root / "vision" / "vision"))
    voxels = TrainTrials(world, 1).num_voxels
    encoder = HierarchicalFMRIEncoder(ENC["tiny"], voxels, shape)
    save_checkpoint(root / "encoder" / "encoder", encoder.state_dict(), kind="encoder", config=ENC["tiny"],
                    extra={"num_voxels": voxels, "subject": 1,
                           "vision": {"shape": dataclasses.asdict(shape), "path": str(root / "vision" / "vision")}})
    tokenizer = MultiScaleVQVAE(TOK["tiny"])
    save_checkpoint(root / "tokenizer" / "tokenizer", tokenizer.state_dict(), kind="tokenizer", config=TOK["tiny"])
    return {"world": world, "encoder": root / "encoder" / "encoder", "tokenizer": root / "tokenizer" / "tokenizer",
            "vision": root / "vision" / "vision", "root": root}


def train_args(stack: dict, out: Path, *extra: str, steps: int = 6) -> list[str]:
    return ["train-generator", "--data", str(stack["world"]), "--encoder", str(stack["encoder"]),
            "--tokenizer", str(stack["tokenizer"]), "--preset", "tiny", "--out", str(out),
            "--steps", str(steps), "--global-batch", "8", "--lr", "3e-3", "--warmup", "2",
            "--sample-every", "0", "--save-every", "0", *extra]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    return make_stack(tmp_path_factory.mktemp("stage2"))


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_loss_falls_and_run_folder_is_complete(stack):
    out = stack["root"] / "run_fall"
    assert cli_main(train_args(stack, out, "--sample-every", "6", steps=12)) == 0
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 13))
    assert log[-1]["loss"] < log[0]["loss"] - 1.0, (log[0]["loss"], log[-1]["loss"])
    assert log[0]["loss"] == pytest.approx(np.log(64), abs=0.3)       # near-uniform over V = 64 at the start
    assert (out / "samples" / "step_0000006.png").exists() and (out / "samples" / "step_0000012.png").exists()
    meta = json.loads((out / "generator.json").read_text())
    assert meta["kind"] == "generator" and meta["progress"]["step"] == 12
    assert meta["encoder"]["kind"] == "encoder" and meta["tokenizer"]["kind"] == "tokenizer"
    assert meta["config"]["scales"] == [1, 2, 3, 4] and meta["config"]["vocab_size"] == 64   # from the tokenizer
    assert meta["config"]["num_levels"] == 4 and meta["config"]["routing"] == "scale-aware"
    tokens = load_file(str(out / "tokens.safetensors"))
    assert tokens["tokens"].shape[1] == 1 + 4 + 9 + 16


def mark_log(out: Path) -> None:
    """Tag the records written so far, to tell them apart from those a later invocation writes."""
    records = read_log(out)
    (out / "log.jsonl").write_text("".join(json.dumps({**r, "earlier": True}) + "\n" for r in records))


def perturb_weights(checkpoint: Path) -> None:
    """Scale the saved model weights by 1.05 (optimizer state untouched)."""
    with safe_open(str(checkpoint), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(checkpoint))
    save_file({k: v * 1.05 if k.endswith("weight") and not k.startswith("optim.") else v
               for k, v in tensors.items()}, str(checkpoint), metadata=metadata)


def test_resume_continues_exactly(stack, capsys):
    """Stopping after 3 of 6 steps and resuming ends bit for bit where an uninterrupted run
    ends. A fresh run is deterministic too, so the test also checks that the resumed invocation
    starts at step 3 (it keeps the first invocation's log lines and writes only steps 4-6) and
    that its result follows the saved weights (perturbed, they give another result)."""
    root = stack["root"]
    straight, split, perturbed = root / "run_straight", root / "run_split", root / "run_perturbed"
    assert cli_main(train_args(stack, straight, "--precision", "fp32")) == 0
    assert cli_main(train_args(stack, split, "--precision", "fp32", "--stop-after", "3")) == 0
    assert json.loads((split / "generator.json").read_text())["progress"]["step"] == 3
    shutil.copytree(split, perturbed)
    mark_log(split)
    capsys.readouterr()
    assert cli_main(train_args(stack, split, "--precision", "fp32", "--resume")) == 0
    assert "at step 3/6" in capsys.readouterr().out
    log = read_log(split)
    assert [(r["step"], r.get("earlier", False)) for r in log] == [(1, True), (2, True), (3, True),
                                                                  (4, False), (5, False), (6, False)]
    a, b = load_file(str(straight / "generator.safetensors")), load_file(str(split / "generator.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["loss"] for r in read_log(straight)] == [r["loss"] for r in log]

    perturb_weights(perturbed / "generator.safetensors")
    assert cli_main(train_args(stack, perturbed, "--precision", "fp32", "--resume")) == 0
    c = load_file(str(perturbed / "generator.safetensors"))
    assert read_log(perturbed)[3]["loss"] != read_log(straight)[3]["loss"]   # step 4 ran on the saved weights
    assert not all(torch.equal(a[key], c[key]) for key in a)


def test_refuses_to_overwrite_or_resume_differently(stack, capsys):
    out = stack["root"] / "run_guard"
    assert cli_main(train_args(stack, out, steps=2)) == 0
    capsys.readouterr()
    for args, message in [
        (train_args(stack, out, steps=2), "pass --resume to continue"),
        (train_args(stack, out, "--resume", "--lr", "1e-3", steps=4), "lr: expected 0.001"),
        (train_args(stack, stack["root"] / "nothing_here", "--resume"), "no checkpoint"),
    ]:
        assert cli_main(args) != 0
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_processes_compute_the_same_gradients_as_one(stack, parallel):
    """One step in fp32: Adam's first moment is 0.1·gradient, so comparing it compares the
    gradients of the global batch (the same samples whatever the process count)."""
    one, two = stack["root"] / f"one_{parallel}", stack["root"] / f"two_{parallel}"
    args = train_args(stack, one, "--precision", "fp32", steps=1)
    assert cli_main(args) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "mindhier",
           *train_args(stack, two, "--precision", "fp32", "--parallel", parallel, steps=1)]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"2 process(es) ({parallel})" in done.stdout
    a, b = load_file(str(one / "generator.safetensors")), load_file(str(two / "generator.safetensors"))
    assert a.keys() == b.keys()
    moments = [k for k in a if k.endswith(".exp_avg")]
    assert len(moments) == sum(1 for k in a if not k.startswith("optim."))
    for key in moments:
        scale = a[key].abs().max().clamp_min(1e-12)
        assert ((a[key] - b[key]).abs().max() / scale) < 1e-4, key
    assert read_log(one)[0]["loss"] == pytest.approx(read_log(two)[0]["loss"], rel=1e-5)


def test_on_the_fly_tokens_match_cached_tokens(stack):
    cached, fly = stack["root"] / "tok_cached", stack["root"] / "tok_fly"
    assert cli_main(train_args(stack, cached, "--precision", "fp32", steps=2)) == 0
    assert cli_main(train_args(stack, fly, "--precision", "fp32", "--tokens", "on-the-fly", steps=2)) == 0
    assert not (fly / "tokens.safetensors").exists()
    assert [r["loss"] for r in read_log(cached)] == pytest.approx([r["loss"] for r in read_log(fly)], rel=1e-6)


def test_init_from_switti_reports_every_tensor(stack, capsys):
    weights = Path(__file__).resolve().parents[2] / "shared" / "reference" / "switti_small_weights.safetensors"
    if not weights.exists():
        pytest.skip(f"upstream reference file {weights} is absent (it lives in ../shared/reference)")
    out = stack["root"] / "from_switti"
    assert cli_main(train_args(stack, out, "--init-switti", str(weights), steps=1)) == 0
    printed = capsys.readouterr().out
    # the tiny preset (width 64) cannot take the 128-wide reference weights: all re-initialised, each with a reason
    assert "re-initialised" in printed and "shape (512, 128) in the checkpoint" in printed
    assert "derived buffer" in printed
    assert json.loads((out / "generator.json").read_text())["init_switti"] == str(weights)


def test_crops_resume_exactly_and_are_recorded(stack, capsys, monkeypatch):
    """--crop resize-crop (appendix E): tokens of fresh crops at every step, recorded in the
    checkpoint; stopping and resuming cuts the same crops as an uninterrupted run."""
    from mindhier.data.crops import ResizeCrop

    cut = []
    original = ResizeCrop.__call__
    monkeypatch.setattr(ResizeCrop, "__call__", lambda self, x, offsets: cut.append(offsets.copy()) or original(self, x, offsets))
    root = stack["root"]
    straight, split = root / "crop_straight", root / "crop_split"
    assert cli_main(train_args(stack, straight, "--precision", "fp32", "--crop", "resize-crop", steps=4)) == 0
    assert len(cut) == 4 and all(o.shape == (8, 2) for o in cut)          # one global batch per step, 32 → 36 → 32
    assert not all(np.array_equal(cut[0], o) for o in cut[1:]) and 0 <= min(o.min() for o in cut) <= max(o.max() for o in cut) <= 4
    assert not (straight / "tokens.safetensors").exists()                 # crops are tokenized on the fly
    meta = json.loads((straight / "generator.json").read_text())
    assert meta["train"]["crop"] == "resize-crop" and meta["stimuli"]["upsampling"] == 1.0
    assert cli_main(train_args(stack, split, "--precision", "fp32", "--crop", "resize-crop", "--stop-after", "2", steps=4)) == 0
    assert cli_main(train_args(stack, split, "--precision", "fp32", "--crop", "resize-crop", "--resume", steps=4)) == 0
    a, b = load_file(str(straight / "generator.safetensors")), load_file(str(split / "generator.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_log(straight)] == [r["loss"] for r in read_log(split)]
    capsys.readouterr()
    for extra, message in [(("--resume",), "crop: expected 'none', checkpoint has 'resize-crop'"),
                           (("--crop", "resize-crop", "--tokens", "cached"), "--tokens cached cannot be used")]:
        assert cli_main(train_args(stack, split if "--resume" in extra else root / "crop_cached", *extra, steps=4)) != 0
        assert message in capsys.readouterr().err


def test_small_stimuli_refused_unless_allowed_and_full_size_preferred(stack, tmp_path, capsys):
    """A generator fed stimuli smaller than its images (224 px for 512 in NSD; 16 for 32 here)
    is refused with the fix; --allow-upsampled-stimuli goes on and is recorded; an imgBrick of
    the generator's size in the folder is then taken over the small file."""
    import h5py

    from mindhier.data import layout

    world = tmp_path / "world"
    shutil.copytree(stack["world"], world)
    with h5py.File(layout.images_hdf5_path(world), "r+") as f:
        full = f["images"][:].astype(np.float32)
        del f["images"]
        f.create_dataset("images", data=torch.nn.functional.avg_pool2d(torch.from_numpy(full), 2).numpy().astype(np.float16))
    small = {**stack, "world": world}
    out = tmp_path / "refused"
    capsys.readouterr()
    assert cli_main(train_args(small, out, steps=1)) != 0
    err = capsys.readouterr().err
    for part in (str(layout.images_hdf5_path(world)), "16×16 px", "32×32", "upsampling blur", "--stimuli PATH",
                 "--allow-upsampled-stimuli", "nsd_stimuli.hdf5"):
        assert part in err, part
    assert not (out / "generator.json").exists()
    assert cli_main(train_args(small, out, "--allow-upsampled-stimuli", steps=1)) == 0
    assert "UPSAMPLED" in capsys.readouterr().out
    record = json.loads((out / "generator.json").read_text())["stimuli"]
    assert record["allow_upsampled_stimuli"] is True and record["upsampling"] == 2.0 and record["kind"] == "hdf5"
    with h5py.File(layout.stimuli_hdf5_path(world), "w") as f:
        f.create_dataset("imgBrick", data=(full.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8))
    assert cli_main(train_args(small, tmp_path / "full", steps=1)) == 0
    record = json.loads((tmp_path / "full" / "generator.json").read_text())["stimuli"]
    assert (record["kind"], record["image_size"], record["upsampling"]) == ("imgbrick", [32, 32], 1.0)


def copy_encoder(stack: dict, folder: Path, **meta_changes) -> Path:
    """A copy of the stack's encoder whose JSON says ``meta_changes`` (e.g. the sessions it trained on)."""
    folder.mkdir(parents=True)
    for suffix in (".safetensors", ".json"):
        shutil.copy(stack["encoder"].with_suffix(suffix), folder / f"encoder{suffix}")
    meta = json.loads((folder / "encoder.json").read_text())
    (folder / "encoder.json").write_text(json.dumps({**meta, **meta_changes}))
    return folder / "encoder"


def test_sessions_and_averaging_are_recorded_and_sessions_must_be_the_encoders(stack, capsys):
    from mindhier.data import layout, read_behav_tar

    root, out = stack["root"], stack["root"] / "run_sessions"
    session_2 = read_behav_tar(layout.train_tar_path(stack["world"], 1, 1))          # train/1.tar = session 2
    assert cli_main(train_args(stack, out, "--sessions", "2", "--averaging", "outputs", "--sample-every", "2",
                               steps=2)) == 0
    assert f"{len(session_2)} trials of sessions 2," in capsys.readouterr().out
    meta = json.loads((out / "generator.json").read_text())
    assert meta["nsd_sessions"] == [2] and meta["train"]["nsd_sessions"] == [2] and meta["averaging"] == "outputs"
    assert meta["data_manifest"]["sessions"] == [2] and (out / "samples" / "step_0000002.png").exists()
    tokens = load_file(str(out / "tokens.safetensors"))["image_index"].numpy()      # only session 2's images
    assert np.array_equal(tokens, np.unique(session_2[:, layout.COL_IMAGE].astype(np.int64)))
    assert cli_main(train_args(stack, out, "--sessions", "3", "--resume", steps=4)) == 2
    assert "nsd_sessions: expected [3], checkpoint has [2]" in capsys.readouterr().err
    one_session = {**stack, "encoder": copy_encoder(stack, root / "enc_session1", nsd_sessions=[1])}
    assert cli_main(train_args(one_session, root / "gen_all", steps=1)) == 2
    assert ("trained on sessions 1 of subject 1, this run would train on sessions 1-5; both stages must see the "
            "same sessions: pass --sessions 1" in capsys.readouterr().err)
    assert cli_main(train_args(one_session, root / "gen_session1", "--sessions", "1", steps=1)) == 0
