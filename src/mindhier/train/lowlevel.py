"""MindHier†: train the low-level decoder (mindhier.lowlevel) on one subject's training trials.

    mindhier train-lowlevel --data worlds/demo --subject 1 --preset demo --out runs/lowlevel

Targets are the stimuli shrunk to the decoder's S×S by area averaging (each target pixel is the
mean of the stimulus pixels it covers: the blur the branch is meant to draw, without aliasing).
The loss is the MSE on those pixels and nothing else: the blend adds the low-level image's
absolute colours into the reconstruction, which a PixCorr term cannot see (it ignores each
image's offset and scale), and MindEye2's branch too trains on a plain distance (L1 to its VAE
latent). AdamW, linear warmup then cosine. Each step's batch and dropout come from (seed, step)
only, so --resume replays exactly. One process: the decoder is small (81 M parameters at the
paper size), and the voxels of one subject fit in memory.

At the end the decoder reads the test set (repetitions averaged: TestSet policy "average") and
OUT/eval.json records the held-out PixCorr (MindEye2's procedure, mindhier.metrics) of its
images upsampled to the stimuli's size as `blend` upsamples them, beside two references: the
mean training image (what an untrained decoder draws) and the S×S stimuli themselves (the most
an S×S picture can score).

OUT/lowlevel.{safetensors,json}   the decoder (mindhier.lowlevel.load_lowlevel)
OUT/last.{safetensors,json}       decoder + optimizer, for --resume
OUT/log.jsonl, OUT/curves.png     loss, learning rate, gradient norm
OUT/eval.json                     held-out PixCorr and its references
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mindhier.checkpoint import (load_checkpoint, load_state_strict, model_tensors, optimizer_from_tensors,
                                 optimizer_to_tensors)
from mindhier.config import get_preset
from mindhier.data import ImageStore, SubjectIndex, TestSet, TrainTrials, data_manifest, diff_manifests
from mindhier.errors import MindhierError
from mindhier.lowlevel import KIND, PRESETS, LowLevelDecoder, predict, save_lowlevel, upsample
from mindhier.metrics.core import pixcorr_per_image
from mindhier.runtime import resolve_device
from mindhier.train import common

SETTINGS = ("subject", "preset", "steps", "batch", "lr", "weight_decay", "warmup", "seed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="data folder in MindEye2 layout (a world or prepared NSD)")
    p.add_argument("--subject", type=int, default=1, help="NSD subject number")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="decoder size (mindhier.lowlevel)")
    p.add_argument("--out", default="runs/lowlevel", help="output folder")
    p.add_argument("--steps", type=int, default=3000, help="optimiser steps")
    p.add_argument("--batch", type=int, default=64, help="trials per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (none on biases/norms)")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps, then cosine to 5%% of --lr")
    p.add_argument("--save-every", type=int, default=500, help="steps between resumable checkpoints")
    p.add_argument("--log-every", type=int, default=25, help="steps between lines of OUT/log.jsonl")
    p.add_argument("--stop-after", type=int, default=None, help="stop after N steps in this invocation (then --resume)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--force", action="store_true", help="start over even if --out holds a run")


# ----------------------------------------------------------------------------- data


def shrink(images: torch.Tensor, size: int) -> torch.Tensor:
    """Area averaging down to size×size: every output pixel is the mean of the pixels it covers."""
    return F.interpolate(images, size=(size, size), mode="area")


def shrunk_stimuli(store: ImageStore, indices: np.ndarray, size: int, chunk: int = 256) -> torch.Tensor:
    """Images ``indices`` (ascending) at size×size, read a chunk at a time (NSD's are 425 px)."""
    parts = [shrink(torch.from_numpy(store.get(indices[i:i + chunk])), size) for i in range(0, len(indices), chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, 3, size, size)


class TrainingSet:
    """The subject's training trials (voxels) and, per trial, its stimulus at the decoder's size."""

    def __init__(self, root: Path, subject: int, index: SubjectIndex, size: int):
        self.trials = TrainTrials(root, subject, index=index)
        images = np.unique(self.trials.image_indices)
        with ImageStore(root) as store:
            self.targets = shrunk_stimuli(store, images, size)
        self.target_row = torch.from_numpy(np.searchsorted(images, self.trials.image_indices))
        self.mean_image = self.targets[self.target_row].mean(0)  # over trials, as the loss weighs them

    def batch(self, step: int, seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        pick = torch.randint(0, len(self.trials), (n,), generator=g).tolist()
        voxels = torch.stack([self.trials[i]["voxels"] for i in pick])
        return voxels, self.targets[self.target_row[pick]]


# ----------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> int:
    out, root = Path(args.out), Path(args.data)
    last, final = out / "last", out / "lowlevel"
    prepare_out(out, args.resume, args.force)
    cfg = get_preset(PRESETS, args.preset, "low-level")
    device = resolve_device(args.device)
    common.seed_everything(args.seed)
    index = SubjectIndex(root, args.subject)
    data = TrainingSet(root, args.subject, index, cfg.image_size)
    model = LowLevelDecoder(cfg, data.trials.num_voxels)
    model.set_mean_image(data.mean_image)
    model.to(device)
    opt = common.adamw(model, args.lr, args.weight_decay)
    settings = {k: getattr(args, k) for k in SETTINGS}
    manifest = data_manifest(root, [args.subject])
    step, before = resume(last, model, opt, settings, manifest, device) if args.resume else (0, 0.0)
    out.mkdir(parents=True, exist_ok=True)
    common.trim_log(out / "log.jsonl", step)
    print(f"train-lowlevel: preset {args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params), "
          f"subject {args.subject}: {len(data.trials)} trials of {data.trials.num_voxels} voxels -> "
          f"{cfg.image_size}x{cfg.image_size} images, batch {args.batch}, device {device}", flush=True)
    end = args.steps if args.stop_after is None else min(args.steps, step + args.stop_after)
    started, bad = time.time(), {}
    bar = common.progress(range(step, end), initial=step, total=args.steps, desc="lowlevel")
    for step in bar:
        model.train()
        common.set_lr(opt, common.warmup_cosine(step, args.steps, args.warmup, args.lr, min_ratio=0.05))
        voxels, target = data.batch(step, args.seed, args.batch)
        torch.manual_seed(args.seed * 1_000_003 + step)  # dropout too replays exactly on --resume
        loss = F.mse_loss(model(voxels.to(device)), target.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if common.check_finite(loss.detach(), step, 5, bad):
            opt.step()
        if (step + 1) % args.log_every == 0 or step + 1 == end:
            common.append_log(out, {"step": step + 1, "loss": round(float(loss.detach()), 6),
                                    "lr": opt.param_groups[0]["lr"], "grad_norm": common.grad_norm(model)})
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        if (step + 1) % args.save_every == 0 and step + 1 < end:
            save(last, model, opt, step + 1, args.subject, settings, manifest, total_seconds(before, started))
            common.plot_curves(out)
    step = end
    seconds = total_seconds(before, started)
    save(last, model, opt, step, args.subject, settings, manifest, seconds)
    common.plot_curves(out)
    if step < args.steps:
        print(f"train-lowlevel: stopped at step {step}/{args.steps}; continue with --resume")
        return 0
    save(final, model, None, step, args.subject, settings, manifest, seconds)
    report = evaluate(model, root, args.subject, index, data.mean_image)
    (out / "eval.json").write_text(json.dumps({**report, "step": step, "preset": args.preset}, indent=1) + "\n")
    print(f"held-out PixCorr of the {cfg.image_size}px images ({report['num_images']} test images, repetitions "
          f"averaged): {report['pixcorr']:.3f}  (mean training image {report['pixcorr_mean_image']:.3f}, "
          f"stimuli at {cfg.image_size}px {report['pixcorr_stimuli_at_size']:.3f})")
    print(f"wrote {final}.safetensors and {out / 'eval.json'}")
    return 0


def prepare_out(out: Path, resume: bool, force: bool) -> None:
    if resume and not (out / "last.json").exists():
        raise MindhierError(f"--resume: {out / 'last.json'} not found; start a new run without --resume")
    if ((out / "last.json").exists() or (out / "lowlevel.json").exists()) and not (resume or force):
        raise MindhierError(f"{out} already holds a low-level run; pass --resume to continue it "
                            "or --force to start over (its files will be overwritten)")
    if force and not resume:  # a fresh run must not leave the old one's results beside its own
        for name in ("lowlevel.json", "lowlevel.safetensors", "eval.json"):
            (out / name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- evaluation


def pixcorr_upsampled(low: torch.Tensor, stimuli: torch.Tensor, chunk: int = 64) -> float:
    """MindEye2's PixCorr of low-resolution images upsampled to the stimuli's size (as blend does)."""
    size = tuple(stimuli.shape[-2:])
    per_image = [pixcorr_per_image(upsample(low[i:i + chunk], size), stimuli[i:i + chunk])
                 for i in range(0, len(low), chunk)]
    return float(np.concatenate(per_image).mean())


def evaluate(model: LowLevelDecoder, root: Path, subject: int, index: SubjectIndex, mean_image: torch.Tensor) -> dict:
    test = TestSet(root, subject, policy="average", index=index)
    voxels = torch.stack([test[i]["voxels"] for i in range(len(test))])
    with ImageStore(root) as store:
        stimuli = torch.from_numpy(store.get(test.image_indices))
    low = predict(model, voxels)
    size = model.cfg.image_size
    return {"num_images": len(test), "policy": "average", "image_size": size,
            "stimulus_size": list(stimuli.shape[-2:]), "upsampling": "bilinear",
            "pixcorr": pixcorr_upsampled(low, stimuli),
            "pixcorr_mean_image": pixcorr_upsampled(mean_image.expand_as(low), stimuli),
            "pixcorr_stimuli_at_size": pixcorr_upsampled(shrink(stimuli, size), stimuli),
            "mse_at_size": float(F.mse_loss(low, shrink(stimuli, size)))}


# ----------------------------------------------------------------------------- checkpoints


def total_seconds(before: float | None, started: float) -> float | None:
    """Training seconds over every invocation of the run (None once a part went unrecorded)."""
    return None if before is None else round(before + time.time() - started, 1)


def save(path: Path, model, opt, step: int, subject: int, settings: dict, manifest: dict, seconds) -> None:
    """OUT/last with the optimizer (opt given), OUT/lowlevel without."""
    extra = {"step": step, "train": settings, "train_seconds": seconds}
    training = {}
    if opt is not None:
        training, extra["optimizer"] = optimizer_to_tensors(opt)
    save_lowlevel(path, model, subject=subject, data_manifest=manifest, extra=extra, training_tensors=training)


def resume(last: Path, model, opt, settings: dict, manifest: dict, device) -> tuple[int, float | None]:
    tensors, meta = load_checkpoint(last, kind=KIND, config=model.cfg, device=device)
    saved = meta["train"]
    diffs = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in settings.items() if saved.get(k) != v]
    diffs += diff_manifests(meta.get("data_manifest", {}), manifest)
    if diffs:
        raise MindhierError(f"--resume: {last}.json was trained differently:\n  " + "\n  ".join(diffs)
                            + "\nResume with the run's settings and data, or start over with --force")
    load_state_strict(model, model_tensors(tensors), last)
    optimizer_from_tensors(opt, tensors, meta["optimizer"])
    print(f"resumed {last}.json at step {meta['step']}", flush=True)
    return int(meta["step"]), meta.get("train_seconds")
