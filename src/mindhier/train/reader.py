"""Train the world reader on the pretraining corpus, with the scene parameters as labels (SPEC §1.4).

    mindhier train-reader --data corpora/demo --world worlds/demo --out runs/reader

Each step draws a batch from (seed, step) only, so ``--resume`` replays exactly; half the images
are blurred (2× down and up) so that the reader also reads soft pictures — reconstructions are
softer than stimuli, and a reader that failed on blur would report the generator's sharpness,
not what it drew. Every 50th corpus image is held out. At the end the reader reads the held-out
corpus images and, with ``--world``, the fMRI world's **test stimuli**; OUT/eval.json records
each attribute's rate with its 95 % interval and whether it passes the 90 % validity bar.

OUT/reader.{safetensors,json}   the model (what the report loads)
OUT/last.{safetensors,json}     model + optimizer, for --resume
OUT/log.jsonl                   loss, training-batch accuracy per attribute, lr, gradient norm
OUT/curves.png                  those curves, redrawn at every checkpoint
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
                                 optimizer_to_tensors, paths_for, save_checkpoint)
from mindhier.config import get_preset
from mindhier.data import ImageStore
from mindhier.data.manifest import data_manifest
from mindhier.errors import MindhierError
from mindhier.train import common
from mindhier.world import reader as R
from mindhier.world.corpus import held_out_images, load_labels


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="the pretraining corpus (`mindhier corpus`)")
    p.add_argument("--world", default=None, help="a synthetic world: also read its test stimuli at the end")
    p.add_argument("--out", default="runs/reader", help="output folder")
    p.add_argument("--preset", default="demo", choices=sorted(R.PRESETS), help="reader size")
    p.add_argument("--steps", type=int, default=3000, help="optimiser steps")
    p.add_argument("--batch", type=int, default=128, help="images per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, warmup + cosine)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (none on biases/norms)")
    p.add_argument("--save-every", type=int, default=500, help="steps between resumable checkpoints")
    p.add_argument("--log-every", type=int, default=25, help="steps between lines of OUT/log.jsonl")
    p.add_argument("--stop-after", type=int, default=None, help="stop after N steps in this invocation (then --resume)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--force", action="store_true", help="start over even if --out holds a run")


class CorpusImages:
    """The corpus's images (uint8, in memory) and labels, split into train and held-out."""

    def __init__(self, root: Path, size: int):
        store = ImageStore(root)
        self.images = torch.from_numpy(store.get_uint8(np.arange(store.num_images)))
        store.close()
        if self.images.shape[-1] != size:
            raise MindhierError(f"{root}: images are {self.images.shape[-1]} px, the reader preset wants {size}")
        self.labels = {k: torch.from_numpy(np.asarray(v)) for k, v in load_labels(root).items()}
        self.held_out = held_out_images(len(self.images))
        self.train = np.setdiff1d(np.arange(len(self.images)), self.held_out)

    def batch(self, step: int, seed: int, n: int) -> tuple[torch.Tensor, dict]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        pick = torch.from_numpy(self.train)[torch.randint(0, len(self.train), (n,), generator=g)]
        blur = torch.rand(n, generator=g) < 0.5
        x = self.images[pick].float() / 255
        if blur.any():
            side = x.shape[-1]
            soft = F.interpolate(F.interpolate(x[blur], scale_factor=0.5, mode="bilinear", antialias=True),
                                 size=(side, side), mode="bilinear")
            x[blur] = soft
        return x, {k: v[pick] for k, v in self.labels.items()}


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    last, final = out / "last", out / "reader"
    if args.resume and not paths_for(last)[1].exists():
        raise MindhierError(f"--resume: no checkpoint {paths_for(last)[1]}; start without --resume")
    if paths_for(last)[1].exists() and not (args.resume or args.force):
        raise MindhierError(f"{out} holds a reader run; pass --resume to continue it or --force to start over")
    cfg = get_preset(R.PRESETS, args.preset, "reader")
    common.seed_everything(args.seed)
    data = CorpusImages(Path(args.data), cfg.image_size)
    model = R.WorldReader(cfg)
    opt = common.adamw(model, args.lr, args.weight_decay)
    settings = {k: getattr(args, k) for k in ("steps", "batch", "lr", "weight_decay", "seed", "preset")}
    manifest = data_manifest(args.data, subjects=[])
    step, before = _resume(last, model, opt, settings, manifest) if args.resume else (0, 0.0)
    out.mkdir(parents=True, exist_ok=True)
    common.trim_log(out / "log.jsonl", step)
    print(f"train-reader: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, "
          f"{len(data.train)} train / {len(data.held_out)} held-out corpus images, batch {args.batch}", flush=True)
    end = args.steps if args.stop_after is None else min(args.steps, step + args.stop_after)
    started = time.time()
    bar = common.progress(range(step, end), initial=step, total=args.steps, desc="reader")
    for step in bar:
        model.train()
        common.set_lr(opt, common.warmup_cosine(step, args.steps, min(100, args.steps // 10), args.lr, min_ratio=0.05))
        x, y = data.batch(step, args.seed, args.batch)
        torch.manual_seed(args.seed * 1_000_003 + step)  # dropout too replays exactly on --resume
        logits = model(x)
        loss = R.loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % args.log_every == 0:
            acc = {k: round(float(v.mean()), 4) for k, v in R.hits(R.predictions(logits), {k: v.numpy() for k, v in y.items()}).items()}
            common.append_log(out, {"step": step + 1, "loss": round(float(loss.detach()), 5), "lr": opt.param_groups[0]["lr"],
                                    "grad_norm": common.grad_norm(model), **acc})
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", shape=f"{acc['main_category']:.2f}")
        if (step + 1) % args.save_every == 0 and step + 1 < end:
            _save(last, model, opt, step + 1, settings, manifest, with_optimizer=True,
                  seconds=_total(before, started))
            common.plot_curves(out)
    step = end
    seconds = _total(before, started)
    _save(last, model, opt, step, settings, manifest, with_optimizer=True, seconds=seconds)
    common.plot_curves(out)
    if step < args.steps:
        print(f"train-reader: stopped at step {step}/{args.steps}; continue with --resume")
        return 0
    _save(final, model, opt, step, settings, manifest, with_optimizer=False, seconds=seconds)
    report = evaluate(model, data, args.world)
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    for where in ("corpus_held_out", "world_test_stimuli"):
        if where in report:
            print(f"{where}: " + "  ".join(f"{k} {v['rate']:.3f}" for k, v in report[where].items()))
    if "valid" in report:
        failing = [k for k, ok in report["valid"].items() if not ok]
        print(f"read from the test stimuli at >= {R.VALID_RATE:.0%}: "
              + (f"all but {', '.join(failing)} (those are shown as not readable)" if failing else "every attribute"))
    print(f"wrote {paths_for(final)[0]} and {out / 'eval.json'}")
    return 0


@torch.no_grad()
def evaluate(model: R.WorldReader, data: CorpusImages, world: str | None) -> dict:
    held = data.held_out
    truth = {k: v[held].numpy() for k, v in data.labels.items()}
    report = {"corpus_held_out": R.rates(R.read(model, data.images[held].float() / 255), truth)}
    if world is not None:
        from mindhier.world.corpus import world_labels
        from mindhier.world.generate import read_world_info

        test = np.asarray(read_world_info(world)["test_images"])
        store = ImageStore(world)
        labels = world_labels(world)
        stim = R.rates(R.read(model, torch.from_numpy(store.get(test))), {k: v[test] for k, v in labels.items()})
        store.close()
        report["world_test_stimuli"] = stim
        report["valid"] = R.validity(stim)
        report["world"] = str(world)
    return report


def _total(before: float | None, started: float) -> float | None:
    """Training seconds over every invocation of the run (None once a part went unrecorded)."""
    return None if before is None else round(before + time.time() - started, 1)


def _save(path: Path, model, opt, step: int, settings: dict, manifest: dict, with_optimizer: bool,
          seconds: float | None) -> None:
    tensors = dict(model.state_dict())
    extra = {"step": step, "train": settings, "data_manifest": manifest, "train_seconds": seconds}
    if with_optimizer:
        optim, info = optimizer_to_tensors(opt)
        tensors.update(optim)
        extra["optimizer"] = info
    save_checkpoint(path, tensors, kind=R.KIND, config=model.cfg, extra=extra)


def _resume(last: Path, model, opt, settings: dict, manifest: dict) -> int:
    tensors, meta = load_checkpoint(last, kind=R.KIND, config=model.cfg)
    diffs = [f"{k}: saved {meta['train'].get(k)!r}, now {v!r}" for k, v in settings.items() if meta["train"].get(k) != v]
    if meta.get("data_manifest") != manifest:
        diffs.append("the corpus differs from the one the run started on")
    if diffs:
        raise MindhierError(f"--resume: {paths_for(last)[1]} was trained differently:\n  " + "\n  ".join(diffs))
    load_state_strict(model, model_tensors(tensors), last)
    optimizer_from_tensors(opt, tensors, meta["optimizer"])
    print(f"resumed {paths_for(last)[1]} at step {meta['step']}", flush=True)
    return int(meta["step"]), meta.get("train_seconds")



