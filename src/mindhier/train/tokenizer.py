"""Train the multi-scale residual VQ-VAE (SPEC §4) on a data folder's stimulus images.

VAR ships no tokenizer training code; this is ours. Loss = L1 + L2 reconstruction (images in
[-1, 1]; no perceptual or GAN term, so nothing needs downloaded weights) + the VQ loss of
the quantiser (codebook term + β·commitment, averaged over scales), with a straight-through
gradient to the encoder. Codebook usage is tracked per scale over a window of steps; codes no
image used during a window are restarted from random residual vectors of the current batch.

Training images are all images except the held-out test (shared1000) images of the subjects
found in DIR; those are used at the end to report PixCorr, SSIM and usage (OUT/eval.json).

    mindhier train-tokenizer --data worlds/demo --preset demo --out runs/tokenizer
    torchrun --standalone --nproc_per_node=2 -m mindhier train-tokenizer --data ... --out ...

OUT holds ``tokenizer.{safetensors,json}`` (the model; ``mindhier.tokenizer.load_tokenizer``),
``last.{safetensors,json}`` (model + optimizer, for ``--resume``), ``log.jsonl`` (loss parts,
learning rate, gradient norm, codebook use every --log-every steps), ``curves.png`` (drawn at
every checkpoint) and ``eval.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mindhier.checkpoint import load_checkpoint, optimizer_from_tensors, optimizer_to_tensors, save_checkpoint
from mindhier.config import get_preset
from mindhier.data import DataError, ImageStore, SubjectIndex, layout
from mindhier.data.manifest import data_manifest, diff_manifests
from mindhier.errors import MindhierError
from mindhier.tokenizer import CHECKPOINT_KIND, PRESETS, MultiScaleVQVAE, model_tensors
from mindhier.train import common
from mindhier.train.distributed import all_reduce_mean, distributed_session, split_global_batch

TRAIN_PREFIX = "train."  # non-model, non-optimizer tensors of a training checkpoint




def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="data folder in MindEye2 layout (e.g. worlds/demo)")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="tokenizer config preset")
    p.add_argument("--out", default="runs/tokenizer", help="output folder (checkpoints, log, eval)")
    p.add_argument("--steps", type=int, default=2400, help="total optimiser steps")
    p.add_argument("--global-batch", type=int, default=16, help="images per step over all processes")
    p.add_argument("--micro-batch", type=int, default=None, help="max images per forward pass (gradient accumulation above it)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (none on biases/norms)")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps, then cosine to 10%% of --lr")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0 = off)")
    p.add_argument("--usage-window", type=int, default=25, help="steps per codebook-usage window")
    p.add_argument("--no-restart", action="store_true", help="do not restart dead codes at the end of each window")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--no-bf16", action="store_true", help="keep float32 even where bf16 autocast is supported")
    p.add_argument("--save-every", type=int, default=500, help="steps between resumable checkpoints")
    p.add_argument("--log-every", type=int, default=10, help="steps between lines of OUT/log.jsonl")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps in this run (checkpoint saved); continue with --resume")
    p.add_argument("--cache-gb", type=float, default=2.0, help="hold the training images in memory (float16) up to this size")
    p.add_argument("--eval-batch", type=int, default=64, help="images per batch at the final evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last exactly where it stopped")
    p.add_argument("--force", action="store_true", help="start over even if OUT already holds a run")


# ----------------------------------------------------------------------------- data


def split_images(root: Path, store: ImageStore) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) image indices: test = the held-out (shared1000) images of every subject
    in ``root``; train = every other image. A pretraining corpus holds out its every 50th image
    (as every model trained on it does); other data without subjects, every 20th."""
    from mindhier.world.corpus import held_out_images, is_corpus

    if is_corpus(root):
        test_idx = held_out_images(store.num_images)
        return np.setdiff1d(np.arange(store.num_images), test_idx), test_idx
    subjects = layout.subjects_in(root)
    test = set()
    for s in subjects:
        test.update(SubjectIndex(root, s, images=store, check_betas=False).test_images.tolist())
    everything = np.arange(store.num_images)
    if not subjects:
        test = set(everything[::20].tolist())
    test_idx = np.array(sorted(test), dtype=np.int64)
    return np.setdiff1d(everything, test_idx), test_idx


def load_images(store: ImageStore, idx: np.ndarray, size: int) -> torch.Tensor:
    """Images as float32 (n, 3, size, size) in [0, 1], resized (antialiased bicubic) if needed."""
    order = np.argsort(idx, kind="stable")  # HDF5 reads want ascending rows
    x = torch.empty((len(idx), 3) + tuple(store.image_size))
    x[torch.from_numpy(order)] = torch.from_numpy(store.get(idx[order]))
    if tuple(store.image_size) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return x


class TrainImages:
    """The training images, held in memory when they fit in ``cache_gb`` — as stored (uint8)
    for a uint8 source at the model's size (the pretraining corpus: 100 k images, 1.2 GB), else
    as float16 (a small world: ~74 MB) — or read from the store batch by batch."""

    def __init__(self, store: ImageStore, idx: np.ndarray, size: int, cache_gb: float, show: bool):
        self.store, self.idx, self.size = store, idx, size
        self.cache = None
        as_stored = store.kind == "imgbrick" and tuple(store.image_size) == (size, size)
        if len(idx) * 3 * size * size * (1 if as_stored else 2) <= cache_gb * 2**30:
            load = ((lambda rows: torch.from_numpy(store.get_uint8(rows))) if as_stored
                    else (lambda rows: load_images(store, rows, size).half()))
            chunks = [load(idx[i:i + 2048])
                      for i in common.progress(range(0, len(idx), 2048), desc="loading images", enabled=show)]
            self.cache = torch.cat(chunks)

    def __len__(self) -> int:
        return len(self.idx)

    def draw(self, n: int, flip: bool, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The choices of one global batch: n random image positions (with replacement) and
        which of them to flip left-right. Every rank draws the same and takes its share, so a
        run's batches do not depend on the number of processes."""
        pick = torch.randint(0, len(self.idx), (n,), generator=g)
        flips = torch.rand(n, generator=g) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
        return pick, flips

    def images(self, pick: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Images at positions ``pick`` in [-1, 1], flipped where ``flips``."""
        if self.cache is None:
            x = load_images(self.store, self.idx[pick.numpy()], self.size)
        else:
            x = self.cache[pick].float() / (255 if self.cache.dtype == torch.uint8 else 1)
        x[flips] = x[flips].flip(-1)
        return MultiScaleVQVAE.images01_to_input(x)


def step_generator(seed: int, step: int) -> torch.Generator:
    # Every random choice of a step comes from (seed, step): --resume replays exactly, and
    # all ranks agree on the global batch.
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 7919)


def rank_batches(images: TrainImages, g: torch.Generator, global_batch: int, micro: int, accum: int,
                 rank: int, flip: bool) -> list[torch.Tensor]:
    """This rank's micro-batches of the step's global batch."""
    pick, flips = images.draw(global_batch, flip, g)
    mine = slice(rank * micro * accum, (rank + 1) * micro * accum)
    pick, flips = pick[mine], flips[mine]
    return [images.images(pick[i * micro:(i + 1) * micro], flips[i * micro:(i + 1) * micro]) for i in range(accum)]


# ----------------------------------------------------------------------------- codebook usage


def usage_summary(hits: torch.Tensor) -> dict:
    """Per scale: fraction of codes used and perplexity exp(H(p)) of the code distribution."""
    hits = hits.double().cpu()
    p = hits / hits.sum(1, keepdim=True).clamp_min(1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(1)
    return {"used_fraction": [round(float(v), 4) for v in (hits > 0).double().mean(1)],
            "perplexity": [round(float(v), 2) for v in entropy.exp()],
            "used_overall": round(float((hits.sum(0) > 0).double().mean()), 4)}


@torch.no_grad()
def restart_dead_codes(model: MultiScaleVQVAE, window_hits: torch.Tensor, residuals: torch.Tensor,
                       opt: torch.optim.Optimizer, g: torch.Generator, distributed: bool) -> int:
    """Re-initialise codes no scale used in the window from random residual vectors (the
    vectors the quantiser just saw), so dead codes come back where the data is. Rank 0
    decides; the codebook is broadcast so every rank stays identical."""
    weight = model.quantize.embedding.weight
    dead = (window_hits.sum(0) == 0).to(weight.device)
    n_dead = int(dead.sum())
    if n_dead == 0:
        return 0
    pick = torch.randint(0, residuals.shape[0], (n_dead,), generator=g).to(residuals.device)
    fresh = residuals[pick].to(weight.dtype)
    weight[dead] = fresh + 1e-3 * fresh.std() * torch.randn(fresh.shape, generator=g).to(fresh.device)
    if distributed:
        dist.broadcast(weight.data, src=0)
    state = opt.state.get(weight, {})
    for key in ("exp_avg", "exp_avg_sq"):  # stale Adam moments would drag the new codes back
        if key in state:
            state[key][dead] = 0
    return n_dead


# ----------------------------------------------------------------------------- evaluation


def pixcorr_per_image(recon: torch.Tensor, gt: torch.Tensor) -> np.ndarray:
    """Pearson r of the flattened RGB pixels, per image (native resolution)."""
    a = recon.flatten(1).double()
    b = gt.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)).numpy()


def ssim_per_image(recon: torch.Tensor, gt: torch.Tensor) -> np.ndarray:
    """Grey-level SSIM (skimage; Gaussian σ 1.5, population covariance, data range 1)."""
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    def grey(x: torch.Tensor) -> np.ndarray:
        return rgb2gray(x.permute(0, 2, 3, 1).double().numpy(), channel_axis=-1)

    return np.array([structural_similarity(r, t, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False) for r, t in zip(grey(recon), grey(gt))])


@torch.no_grad()
def reconstruct(model: MultiScaleVQVAE, images01: torch.Tensor, device: torch.device, batch: int):
    """(reconstructions in [0, 1], per-scale hits) through the discrete path: image -> tokens -> image."""
    model.eval()
    recons, hits = [], torch.zeros(len(model.scales), model.vocab_size)
    for i in range(0, len(images01), batch):
        x = model.images01_to_input(images01[i:i + batch].to(device))
        idx = model.img_to_indices(x)
        for k, r in enumerate(idx):
            hits[k] += torch.bincount(r.flatten().cpu(), minlength=model.vocab_size).float()
        recons.append(model.output_to_images01(model.indices_to_img(idx)).float().cpu())
    return torch.cat(recons), hits


def evaluate(model: MultiScaleVQVAE, images01: torch.Tensor, device: torch.device, batch: int = 64) -> dict:
    recon, hits = reconstruct(model, images01, device, batch)
    return {"num_images": len(images01), "image_size": model.image_size,
            "pixcorr": float(pixcorr_per_image(recon, images01).mean()),
            "ssim": float(ssim_per_image(recon, images01).mean()),
            "mse": float(F.mse_loss(recon, images01)),
            "usage": usage_summary(hits)}


# ----------------------------------------------------------------------------- checkpoints


def save_training_state(out: Path, name: str, model: MultiScaleVQVAE, opt, step: int, window_hits, extra: dict) -> None:
    tensors = dict(model.state_dict())
    opt_tensors, opt_info = optimizer_to_tensors(opt)
    tensors.update(opt_tensors)
    tensors[TRAIN_PREFIX + "window_hits"] = window_hits
    save_checkpoint(out / name, tensors, kind=CHECKPOINT_KIND, config=model.cfg,
                    extra={**extra, "step": step, "optimizer": opt_info})


def resume_state(out: Path, model: MultiScaleVQVAE, opt, device, manifest: dict | None) -> tuple[int, torch.Tensor]:
    """Load OUT/last into model and optimizer; (step, usage-window hits). Warns when the data
    differ from the data the run started on."""
    tensors, meta = load_checkpoint(out / "last", kind=CHECKPOINT_KIND, config=model.cfg)
    model.load_state_dict(model_tensors(tensors), strict=True)
    optimizer_from_tensors(opt, {k: v.to(device) for k, v in tensors.items()}, meta["optimizer"])
    if manifest and meta.get("data_manifest"):
        for line in diff_manifests(meta["data_manifest"], manifest):
            print(f"train-tokenizer: warning: resuming on other data: {line}")
    return int(meta["step"]), tensors[TRAIN_PREFIX + "window_hits"].to(device)


def prepare_out(out: Path, resume: bool, force: bool, create: bool = True) -> None:
    exists = (out / "last.json").exists() or (out / "tokenizer.json").exists()
    if resume and not (out / "last.json").exists():
        raise MindhierError(f"--resume: {out / 'last.json'} not found; start a new run without --resume")
    if exists and not (resume or force):
        raise MindhierError(f"{out} already holds a tokenizer run; pass --resume to continue it "
                            "or --force to start over (its files will be overwritten)")
    if create:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:  # --force: a fresh run starts a fresh log
            (out / "log.jsonl").unlink(missing_ok=True)




# ----------------------------------------------------------------------------- training


def train_step(model, ddp_model, opt, batches, args, device, want_residuals: bool):
    """One optimiser step over the micro-batches; returns (metrics, hits, residuals, ok)."""
    opt.zero_grad(set_to_none=True)
    totals = {"loss": 0.0, "recon": 0.0, "vq": 0.0}
    hits, residuals, finite = None, None, True
    for i, x in enumerate(batches):
        x = x.to(device)
        sample = model.vocab_size if want_residuals and i == len(batches) - 1 else 0
        with common.autocast(device, enabled=not args.no_bf16):
            recon, vq_loss, stats = ddp_model(x, residual_sample=sample)
        recon = recon.float()
        rec_loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        loss = rec_loss + vq_loss
        finite &= bool(torch.isfinite(loss))
        (loss / len(batches)).backward()
        for key, value in (("loss", loss), ("recon", rec_loss), ("vq", vq_loss)):
            totals[key] += float(value.detach()) / len(batches)
        hits = stats["hits"] if hits is None else hits + stats["hits"]
        residuals = stats.get("residuals", residuals)
    return totals, hits, residuals, finite


def run(args: argparse.Namespace) -> int:
    with distributed_session(args.device) as d:
        return _run(args, d)


def _run(args: argparse.Namespace, d) -> int:
    cfg = get_preset(PRESETS, args.preset, "tokenizer")
    out, root = Path(args.out), Path(args.data)
    prepare_out(out, args.resume, args.force, create=d.is_main)  # every rank checks: none is left waiting
    store = ImageStore(root)
    train_idx, test_idx = split_images(root, store)
    if len(train_idx) == 0:
        raise DataError(f"{root}: no training images left after holding out {len(test_idx)} test images")
    micro, accum = split_global_batch(args.global_batch, d.world_size, args.micro_batch)
    train_images = TrainImages(store, train_idx, cfg.image_size, args.cache_gb, d.is_main)

    common.seed_everything(args.seed)
    model = MultiScaleVQVAE(cfg).to(d.device)
    opt = common.adamw(model, args.lr, args.weight_decay, betas=(0.9, 0.95))
    window_hits = torch.zeros(len(cfg.scales), cfg.vocab_size, device=d.device)
    step, manifest = 0, data_manifest(root)
    if args.resume:
        step, window_hits = resume_state(out, model, opt, d.device, manifest)
        if d.is_main:
            common.trim_log(out / "log.jsonl", step)
            print(f"resumed {out / 'last.json'} at step {step}/{args.steps}", flush=True)
    ddp_model = model
    if d.enabled:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)

    extra = {"preset": args.preset, "data": str(root), "data_manifest": manifest,
             "train_images": int(len(train_idx)), "test_images": int(len(test_idx)),
             "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}}
    if d.is_main:
        print(f"train-tokenizer: preset {args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params), "
              f"{len(train_idx)} train / {len(test_idx)} test images of {store.image_size} -> {cfg.image_size} px, "
              f"global batch {args.global_batch} = {d.world_size} x {accum} x {micro}, device {d.device}")
    end = args.steps if args.stop_after is None else min(args.steps, step + args.stop_after)
    usage = usage_summary(window_hits) if window_hits.any() else None
    bad: dict = {}
    started = time.time()
    bar = common.progress(range(step, end), initial=step, total=args.steps, desc="tokenizer", enabled=d.is_main)
    for step in bar:
        model.train()
        g = step_generator(args.seed, step)
        torch.manual_seed(args.seed * 1_000_003 + step * 7919 + d.rank)  # residual sampling in the quantiser
        end_of_window = (step + 1) % args.usage_window == 0
        batches = rank_batches(train_images, g, args.global_batch, micro, accum, d.rank, not args.no_flip)
        common.set_lr(opt, common.warmup_cosine(step, args.steps, args.warmup, args.lr, min_ratio=0.1))
        metrics, hits, residuals, finite = train_step(model, ddp_model, opt, batches, args, d.device,
                                                      end_of_window and not args.no_restart)
        norm = math.nan
        if common.check_finite(torch.tensor(metrics["loss"] if finite else math.nan), step, 5, bad):
            if args.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            elif d.is_main and ((step + 1) % args.log_every == 0 or step + 1 == end):
                norm = common.grad_norm(model)  # only for the log: one host sync, on logged steps
            opt.step()
        if d.enabled:  # report the global batch's losses, not this rank's share
            mean = all_reduce_mean(torch.tensor(list(metrics.values()), device=d.device), d)
            metrics = dict(zip(metrics, mean.tolist()))
        window_hits += hits
        if end_of_window:
            window_hits = all_reduce_mean(window_hits, d) * d.world_size
            usage = usage_summary(window_hits)
            if not args.no_restart:
                usage["restarted"] = restart_dead_codes(model, window_hits, residuals, opt, g, d.enabled)
            window_hits.zero_()
        if d.is_main:
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", used=f"{usage['used_overall']:.2f}" if usage else "-")
            if (step + 1) % args.log_every == 0 or step + 1 == end:
                common.append_log(out, {"step": step + 1, **{k: round(v, 6) for k, v in metrics.items()},
                           "lr": opt.param_groups[0]["lr"], "grad_norm": float(norm), "usage": usage})
            if (step + 1) % args.save_every == 0 and step + 1 < end:
                save_training_state(out, "last", model, opt, step + 1, window_hits, extra)
                common.plot_curves(out)
    step = end
    seconds = time.time() - started
    if d.is_main:
        save_training_state(out, "last", model, opt, step, window_hits, extra)
        common.plot_curves(out)
        if step >= args.steps:
            _finish(out, model, store, test_idx, d.device, args, {**extra, "step": step, "train_seconds_last_run": seconds})
        else:
            print(f"train-tokenizer: stopped at step {step}/{args.steps}; continue with --resume")
    return 0


def _finish(out: Path, model, store, test_idx, device, args, extra: dict) -> None:
    """Save the final model-only checkpoint, evaluate held-out images, write eval.json."""
    save_checkpoint(out / "tokenizer", model.state_dict(), kind=CHECKPOINT_KIND, config=model.cfg, extra=extra)
    images = load_images(store, test_idx, model.image_size)
    result = evaluate(model, images, device, args.eval_batch)
    result.update({"step": extra["step"], "preset": args.preset, "train_seconds_last_run": round(extra["train_seconds_last_run"], 1)})
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    u = result["usage"]
    print(f"held-out ({result['num_images']} images, {result['image_size']} px): PixCorr {result['pixcorr']:.3f}  "
          f"SSIM {result['ssim']:.3f}  codebook used per scale {u['used_fraction']}  perplexity {u['perplexity']}")
    print(f"wrote {out / 'tokenizer.safetensors'} and {out / 'eval.json'}")

