"""`mindhier train-tokenizer`: loss falls, exact resume, checkpoint metadata, evaluation."""

import argparse
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mindhier.errors import MindhierError
from mindhier.tokenizer import load_tokenizer
from mindhier.train import tokenizer as train_tok


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """A data folder holding only an image file: 40 smooth random 32-px images."""
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    images = F.interpolate(torch.rand(40, 3, 4, 4, generator=g), size=(32, 32), mode="bilinear", align_corners=False)
    with h5py.File(root / "coco_images_224_float16.hdf5", "w") as f:
        f.create_dataset("images", data=images.numpy().astype(np.float16))
    return root


def run_cli(root, out, *extra):
    parser = argparse.ArgumentParser()
    train_tok.add_arguments(parser)
    args = parser.parse_args(["--data", str(root), "--preset", "tiny", "--out", str(out), "--global-batch", "8",
                              "--lr", "2e-3", "--warmup", "2", "--usage-window", "4", "--log-every", "1",
                              "--device", "cpu", "--no-bf16", *map(str, extra)])
    assert train_tok.run(args) == 0
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_loss_falls_and_checkpoint_records_config_and_commit(image_root, tmp_path):
    log = run_cli(image_root, tmp_path / "run", "--steps", 100)
    first, last = log[0]["loss"], np.mean([r["loss"] for r in log[-10:]])  # untrained vs trained
    assert last < 0.8 * first, (first, last)
    assert [r["step"] for r in log] == list(range(1, 101))
    assert set(log[-1]["usage"]) >= {"used_fraction", "perplexity", "used_overall"}
    meta = json.loads((tmp_path / "run" / "tokenizer.json").read_text())
    assert meta["kind"] == "tokenizer" and meta["config"]["image_size"] == 32
    assert meta["git_commit"] and meta["step"] == 100 and meta["test_images"] == 2  # every 20th of 40
    model = load_tokenizer(tmp_path / "run" / "tokenizer")
    assert load_tokenizer(tmp_path / "run" / "last").state_dict().keys() == model.state_dict().keys()
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert -1 <= ev["pixcorr"] <= 1 and ev["num_images"] == 2 and len(ev["usage"]["used_fraction"]) == 4


def mark_log(out) -> None:
    """Tag the records written so far, to tell them apart from those a later invocation writes."""
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    (out / "log.jsonl").write_text("".join(json.dumps({**r, "earlier": True}) + "\n" for r in records))


def perturb_weights(checkpoint) -> None:
    """Scale the saved model weights by 1.05 (optimizer state untouched)."""
    with safe_open(str(checkpoint), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(checkpoint))
    save_file({k: v * 1.05 if k.endswith("weight") and not k.startswith("optim.") else v
               for k, v in tensors.items()}, str(checkpoint), metadata=metadata)


def test_resume_continues_exactly(image_root, tmp_path):
    """Stopping after 6 of 10 steps and resuming ends bit for bit where an uninterrupted run
    ends. A fresh run is deterministic too, so the test also checks that the resumed invocation
    starts at step 6 (it keeps the first invocation's log lines and writes only steps 7-10) and
    that its result follows the saved weights (perturbed, they give another result)."""
    full = run_cli(image_root, tmp_path / "full", "--steps", 10)
    run_cli(image_root, tmp_path / "split", "--steps", 10, "--stop-after", 6)
    assert not (tmp_path / "split" / "tokenizer.json").exists()  # unfinished: no final model yet
    shutil.copytree(tmp_path / "split", tmp_path / "perturbed")
    mark_log(tmp_path / "split")
    resumed = run_cli(image_root, tmp_path / "split", "--steps", 10, "--resume")
    assert [(r["step"], r.get("earlier", False)) for r in resumed] == [(s, s <= 6) for s in range(1, 11)]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    a = load_tokenizer(tmp_path / "full" / "tokenizer").state_dict()
    b = load_tokenizer(tmp_path / "split" / "tokenizer").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    perturb_weights(tmp_path / "perturbed" / "last.safetensors")
    other = run_cli(image_root, tmp_path / "perturbed", "--steps", 10, "--resume")
    assert other[6]["loss"] != full[6]["loss"]   # step 7 ran on the saved weights
    c = load_tokenizer(tmp_path / "perturbed" / "tokenizer").state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_refuses_to_overwrite_a_run(image_root, tmp_path):
    run_cli(image_root, tmp_path / "run", "--steps", 1)
    with pytest.raises(MindhierError, match="--resume .* or --force"):
        run_cli(image_root, tmp_path / "run", "--steps", 1)
    assert [r["step"] for r in run_cli(image_root, tmp_path / "run", "--steps", 2, "--force")] == [1, 2]
    with pytest.raises(MindhierError, match="not found"):
        run_cli(image_root, tmp_path / "fresh", "--steps", 1, "--resume")


def test_dead_code_restart_revives_unused_codes():
    model = train_tok.MultiScaleVQVAE(train_tok.PRESETS["tiny"])
    opt = torch.optim.AdamW(model.parameters())
    hits = torch.zeros(4, 64)
    hits[:, :10] = 1
    residuals = torch.randn(100, 8) * 5
    before = model.quantize.embedding.weight.detach().clone()
    n = train_tok.restart_dead_codes(model, hits, residuals, opt, torch.Generator().manual_seed(0), False)
    after = model.quantize.embedding.weight.detach()
    assert n == 54 and torch.equal(after[:10], before[:10])
    # every restarted code sits (up to the small jitter) on one of the residual vectors
    dist = torch.cdist(after[10:], residuals).min(1).values
    assert (dist < 0.1).all()


def test_metrics_against_known_answers():
    x = torch.rand(3, 3, 16, 16)
    assert np.allclose(train_tok.pixcorr_per_image(x, x), 1.0)
    assert np.allclose(train_tok.pixcorr_per_image(1 - x, x), -1.0)
    assert np.allclose(train_tok.ssim_per_image(x, x), 1.0)
    assert (train_tok.ssim_per_image(torch.rand(3, 3, 16, 16), x) < 0.5).all()
    u = train_tok.usage_summary(torch.tensor([[1.0, 1, 0, 0], [4, 0, 0, 0]]))
    assert u["used_fraction"] == [0.5, 0.25] and u["perplexity"] == [2.0, 1.0] and u["used_overall"] == 0.5


def test_torchrun_two_processes_match_one(image_root, tmp_path):
    """2 gloo processes share each global batch: same losses and weights as one process."""
    import os
    import subprocess
    import sys

    common = ["--steps", 6, "--no-restart"]
    one = run_cli(image_root, tmp_path / "one", *common)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mindhier",
           "train-tokenizer", "--data", str(image_root), "--preset", "tiny", "--out", str(tmp_path / "two"),
           "--global-batch", "8", "--lr", "2e-3", "--warmup", "2", "--usage-window", "4", "--log-every", "1",
           "--device", "cpu", "--no-bf16", *map(str, common)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "= 2 x 1 x 4" in done.stdout
    two = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4)
    a = load_tokenizer(tmp_path / "one" / "tokenizer")
    b = load_tokenizer(tmp_path / "two" / "tokenizer")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-4), name
