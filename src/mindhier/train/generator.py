"""Stage 2: train the scale-aware generator on a frozen encoder and tokenizer (paper §3.3,
appendix E; SPEC §5, §7).

Each step draws training trials, zeroes the voxels of 10 % of them (classifier-free guidance:
the null condition is the encoder's output for zero voxels), runs the frozen encoder to get
e_1..e_M, and trains the generator with teacher forcing on the stimulus's token pyramid:
cross-entropy over all L tokens, uniform 1/L. AdamW (0.9, 0.95), warmup then cosine, gradient
clipping at 1.0, bf16 autocast where supported.

    mindhier train-generator --data worlds/demo --subject 1 --encoder runs/encoder/encoder \\
        --tokenizer runs/tokenizer/tokenizer --out runs/generator
    torchrun --standalone --nproc_per_node=2 -m mindhier train-generator ...   (same flags)

Several processes: FSDP2 (``fully_shard`` per block, then the root; frozen encoder and tokenizer
replicated) — it runs on CPU/gloo as well as CUDA/NCCL; ``--parallel ddp`` uses DDP instead. The
global batch of every step is drawn from (seed, step) and split over ranks, so 1 and N processes
train on the same samples. The stimuli are the largest the data holds (NSD's own 425-px
nsd_stimuli.hdf5 before MindEye2's 224-px file; ``--stimuli``), refused when too small for the
tokenizer (mindhier.data.stimuli); ``--crop resize-crop`` is the paper's random-crop augmentation
(mindhier.data.crops). ``--init-switti FILE`` starts the body from a released Switti
checkpoint (the paper's stage 2 is "pretrained by Switti") and prints what was loaded and what
was re-initialised. ``--sessions`` trains on some scan sessions only, the encoder's
(mindhier.train.sessions; Table S2 is ``--sessions 1``); ``--averaging`` says how the sample
grid uses the test repetitions.

OUT/generator.{safetensors,json}   model + optimizer (``--resume`` continues exactly)
OUT/tokens.safetensors             the training images' token pyramids (computed once; not with crops)
OUT/samples/step_NNNNNNN.png       test stimuli (top) and reconstructions (bottom), periodically
OUT/log.jsonl                      loss, token accuracy, lr, gradient norm (one line per step)
OUT/curves.png                     those curves, redrawn at every checkpoint
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mindhier.checkpoint import check_config, load_checkpoint, load_state_strict, paths_for, save_checkpoint
from mindhier.config import diff_configs, get_preset, to_dict
from mindhier.data import SubjectIndex, TestSet, averaging, data_manifest, diff_manifests, stimuli
from mindhier.data.crops import CROP_MODES, ResizeCrop, token_mode
from mindhier.encoder import load_encoder
from mindhier.errors import MindhierError
from mindhier.generator import PRESETS, ROUTINGS, ScaleAwareGenerator, load_switti_weights
from mindhier.reconstruct import (
    GENERATOR_KIND, TRAINING_PREFIXES, checkpoint_identity, encode_conditions, generator_config_for,
)
from mindhier.sampling import SamplingSettings, reconstruct
from mindhier.tokenizer import load_tokenizer
from mindhier.train import common, recipes, sessions
from mindhier.train.distributed import Dist, all_reduce_mean, distributed_session, split_global_batch
from mindhier.train.fsdp import full_weights, optimizer_tensors, parallelize, restore_optimizer, state_options

CHECKPOINT = "generator"


@dataclass(frozen=True)
class TrainSettings:
    """Run settings besides the model shape; compared on --resume."""

    subject: int
    steps: int
    global_batch: int
    lr: float
    weight_decay: float
    warmup: int
    grad_clip: float
    seed: int
    precision: str
    crop: str = "none"
    nsd_sessions: tuple[int, ...] | None = None  # --sessions, numbered from 1 (None: all); mindhier.train.sessions


# What checkpoints written before a setting existed trained with (compared on --resume).
LEGACY_TRAIN = {"crop": "none", "nsd_sessions": None}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="data folder in MindEye2 layout (a world or prepared NSD)")
    p.add_argument("--subject", type=int, default=1, help="NSD subject number (the encoder's)")
    p.add_argument("--encoder", required=True, help="frozen stage-1 encoder: a train-encoder checkpoint")
    p.add_argument("--tokenizer", required=True, help="frozen tokenizer: a train-tokenizer checkpoint")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                   help="generator size; scales/vocabulary/context widths always follow the frozen models")
    p.add_argument("--routing", default="scale-aware", choices=ROUTINGS,
                   help="which fMRI level each scale reads: the paper's coarse-to-fine, its inverted "
                        "ablation (Table 4), e_M only (Table 2), or everything")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=None, help=recipes.recipe_help("generator", "steps", "optimiser steps"))
    p.add_argument("--global-batch", type=int, default=None,
                   help=recipes.recipe_help("generator", "global_batch", "samples per step over all processes"))
    p.add_argument("--max-micro-batch", type=int, default=None, help="largest per-process forward; above it, accumulate")
    p.add_argument("--lr", type=float, default=None, help=recipes.recipe_help("generator", "lr", "peak learning rate"))
    p.add_argument("--weight-decay", type=float, default=None,
                   help=recipes.recipe_help("generator", "weight_decay", "AdamW weight decay (none on biases/norms)"))
    p.add_argument("--warmup", type=int, default=None,
                   help=recipes.recipe_help("generator", "warmup", "linear warmup steps, then cosine decay"))
    p.add_argument("--grad-clip", type=float, default=None,
                   help=recipes.recipe_help("generator", "grad_clip", "gradient-norm clipping"))
    p.add_argument("--cond-drop", type=float, default=None,
                   help=recipes.recipe_help("generator", "cond_drop", "probability of zeroing a sample's voxels (CFG)"))
    p.add_argument("--tokens", default=None, choices=("cached", "on-the-fly"),
                   help="tokenize the training images once (OUT/tokens.safetensors; the default without crops) "
                        "or every step (the default, and the only way, with --crop resize-crop)")
    p.add_argument("--crop", default=None, choices=CROP_MODES,
                   help=recipes.recipe_help("generator", "crop", "augmentation (paper appendix E): resize-crop = "
                                            "Resize(size*576/512, Lanczos) then a random size x size crop from "
                                            "(seed, step, sample), as the official code; none = whole images"))
    recipes.add_recipe_argument(p, "generator")
    stimuli.add_arguments(p)
    sessions.add_argument(p)
    averaging.add_argument(p, "the sample grid (recorded in the checkpoint)")
    p.add_argument("--init-switti", default=None, help="start from released Switti weights (.safetensors)")
    p.add_argument("--init", default=None,
                   help="start from a mindhier generator checkpoint, e.g. the foundation generator that "
                        "`pretrain-generator` trained on the corpus (its config is used; it must have been "
                        "pretrained on the encoder's vision model and layers and on --tokenizer), or another "
                        "subject's stage-2 generator (the new-subject recipe, docs/new_subject.md)")
    add_loop_arguments(p, sample_every=500, sample_what="test images")


def add_loop_arguments(p: argparse.ArgumentParser, sample_every: int, sample_what: str) -> None:
    """The flags of the stage-2 loop itself, shared with `pretrain-generator`."""
    p.add_argument("--parallel", default="fsdp", choices=("fsdp", "ddp"), help="multi-process strategy")
    p.add_argument("--sample-every", type=int, default=sample_every,
                   help="write a sample grid every N steps (0: only at the end)")
    p.add_argument("--sample-images", type=int, default=8, help=f"{sample_what} in the sample grid")
    p.add_argument("--sample-cfg", type=float, default=3.0, help="CFG of the sample grid")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    p.add_argument("--stop-after", type=int, default=None, help="stop after N steps in this invocation (then --resume)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32"), help="auto: bf16 autocast where fast")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--force", action="store_true", help="overwrite an existing run in --out")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")


def run(args: argparse.Namespace) -> int:
    with distributed_session(args.device) as d:
        Trainer(args, d).fit()
    return 0


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, args: argparse.Namespace, d: Dist):
        recipes.resolve(args, "generator")  # the schedule flags left out take the --recipe's values
        self.args, self.d, self.device = args, d, d.device
        self.out = Path(args.out)
        self.ckpt = self.out / CHECKPOINT
        saved = paths_for(self.ckpt)[1]  # the .json is a save's commit (its weights may still be a temp file)
        if args.resume and not saved.exists():
            raise MindhierError(f"--resume: no checkpoint {saved}; start without --resume")
        if saved.exists() and not (args.resume or args.force):
            raise MindhierError(f"{saved} exists; pass --resume to continue that run or --force to start over")
        common.seed_everything(args.seed)
        self._load_frozen()
        self._build()

    def _load_frozen(self) -> None:
        a = self.args
        index = SubjectIndex(a.data, a.subject)
        self.train = sessions.training_trials(a.data, a.subject, sessions.parse(a.sessions), index)
        self.test = TestSet(a.data, a.subject, policy=averaging.dataset_policy(a.averaging), index=index,
                            expected_voxels=self.train.num_voxels)
        self.images = stimuli.open_largest(a.data, a.stimuli)  # full-size stimuli when the data holds them
        stimuli.check_covers(self.images, np.concatenate([self.train.image_indices, self.test.image_indices]))
        self.encoder, self.enc_meta = load_encoder(a.encoder, num_voxels=self.train.num_voxels, subject=a.subject,
                                                   device=self.device)
        self.encoder.requires_grad_(False)
        sessions.check_same_sessions(self.enc_meta, sessions.trained_on(self.train), a.encoder)
        self.tokenizer = load_tokenizer(a.tokenizer, device=self.device).requires_grad_(False)
        self.tok_meta = load_checkpoint(a.tokenizer, kind="tokenizer")[1]
        self.stimuli = stimuli.check_resolution(self.images, self.tokenizer.image_size, a.allow_upsampled_stimuli)
        self.manifest = data_manifest(a.data, [a.subject], sessions=sessions.trained_on(self.train))
        if len(self.train) < a.global_batch:
            raise MindhierError(f"subject {a.subject} has {len(self.train)} training trials, fewer than "
                                f"--global-batch {a.global_batch}; lower the batch")

    def _generator_config(self):
        """The preset with the frozen models' interface; with --init, the init checkpoint's own
        config (checked against that interface)."""
        a = self.args
        base = get_preset(PRESETS, a.preset, "generator")
        cfg = generator_config_for(base, self.encoder, self.tokenizer, routing=a.routing, cond_drop_prob=a.cond_drop)
        if getattr(a, "init", None) is None:
            return cfg
        from mindhier.generator.pretrained import check_init_matches

        self.init_tensors, init_meta = load_checkpoint(a.init, kind=GENERATOR_KIND)
        return check_init_matches(init_meta, cfg, self.enc_meta, self.tok_meta, a.init)

    def _build(self) -> None:
        a, d = self.args, self.d
        self.cfg = self._generator_config()
        self.settings = TrainSettings(subject=a.subject, steps=a.steps, global_batch=a.global_batch, lr=a.lr,
                                      weight_decay=a.weight_decay, warmup=a.warmup, grad_clip=a.grad_clip,
                                      seed=a.seed, precision=a.precision, crop=getattr(a, "crop", "none"),
                                      nsd_sessions=sessions.parse(getattr(a, "sessions", None)))
        self.cropper = (ResizeCrop(self.tokenizer.image_size, tuple(self.images.image_size), a.seed)
                        if self.settings.crop == "resize-crop" else None)
        torch.manual_seed(a.seed)
        self.model = ScaleAwareGenerator(self.cfg)
        if a.init_switti and not a.resume:
            report = load_switti_weights(self.model, a.init_switti)
            if d.is_main:
                print(report.summary(), flush=True)
        if getattr(a, "init", None) and not a.resume:
            load_state_strict(self.model, {k: v for k, v in self.init_tensors.items()
                                           if not k.startswith(TRAINING_PREFIXES)}, a.init)
            if d.is_main:
                print(f"starting from the pretrained generator {a.init}", flush=True)
        self.init_tensors = None
        self.step, resume = 0, None
        if a.resume:
            resume = self._read_resume()
        self.model.to(self.device)
        self.wrapped = parallelize(self.model, d, a.parallel)
        self.optimizer = common.adamw(self.model, a.lr, a.weight_decay, betas=(0.9, 0.95))
        if resume is not None:
            restore_optimizer(self.model, self.optimizer, *resume)
        self.micro, self.accum = split_global_batch(a.global_batch, d.world_size, a.max_micro_batch)
        self.tokens = self._token_table() if token_mode(a.tokens, self.settings.crop) == "cached" else None

    # ---- checkpoints ----------------------------------------------------------------------
    def _meta(self) -> dict:
        return {"subject": self.args.subject, "num_voxels": self.train.num_voxels,
                "nsd_sessions": sessions.trained_on(self.train), "averaging": self.args.averaging,
                "recipe": {"name": getattr(self.args, "recipe", None), "sources": self.args.recipe_sources},
                "encoder": checkpoint_identity(self.enc_meta), "tokenizer": checkpoint_identity(self.tok_meta),
                "encoder_path": str(self.args.encoder), "tokenizer_path": str(self.args.tokenizer),
                "train": to_dict(self.settings), "data_manifest": self.manifest, "stimuli": self.stimuli,
                "init_switti": self.args.init_switti, "init": getattr(self.args, "init", None),
                "progress": {"step": self.step, "world_size": self.d.world_size, "parallel": self.args.parallel}}

    def _save(self) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        tensors = get_model_state_dict(self.model, options=state_options(cpu_offload=True))
        optim, info = optimizer_tensors(self.model, self.optimizer)
        if self.d.is_main:
            meta = self._meta()
            meta["optimizer"] = info
            save_checkpoint(self.ckpt, {**tensors, **optim}, kind=GENERATOR_KIND, config=self.cfg, extra=meta)

    def _read_resume(self):
        tensors, meta = load_checkpoint(self.ckpt, kind=GENERATOR_KIND)
        where = paths_for(self.ckpt)[1]
        check_config(meta, self.cfg, where)
        diffs = diff_configs(to_dict(self.settings), {**LEGACY_TRAIN, **meta.get("train", {})})
        diffs += self._frozen_diffs(meta)
        if getattr(self, "stimuli", None) is not None:
            diffs += stimuli.diff_stimuli(meta.get("stimuli"), self.stimuli)
        diffs += diff_manifests(meta.get("data_manifest", {}), self.manifest)
        if diffs:
            raise MindhierError(f"--resume: {where} was trained differently:\n  " + "\n  ".join(diffs)
                                + "\nRerun with the same flags and inputs, or start a new run in another --out.")
        load_state_strict(self.model, {k: v for k, v in tensors.items() if not k.startswith(TRAINING_PREFIXES)}, where)
        self.step = int(meta["progress"]["step"])
        if self.d.is_main:
            print(f"resumed {where} at step {self.step}/{self.args.steps}", flush=True)
        return tensors, meta["optimizer"]

    def _frozen_diffs(self, meta: dict) -> list[str]:
        """How the frozen models differ from those the checkpoint was trained with."""
        return [f"{role}: the checkpoint was trained with another {role} ({meta.get(f'{role}_path')})"
                for role, own in (("encoder", self.enc_meta), ("tokenizer", self.tok_meta))
                if meta.get(role) != checkpoint_identity(own)]

    # ---- data -----------------------------------------------------------------------------
    def _load_images(self, image_indices: np.ndarray, crops: np.ndarray | None = None) -> torch.Tensor:
        """Stimuli in the tokenizer's [-1, 1] input range at its resolution: whole images resized,
        or with ``crops`` (top-left corners) the resize-crop windows."""
        order = np.argsort(image_indices)
        x = torch.empty((len(image_indices), 3) + tuple(self.images.image_size))
        x[torch.from_numpy(order)] = torch.from_numpy(self.images.get(image_indices[order]))
        size = self.tokenizer.image_size
        if crops is not None:
            x = self.cropper(x, crops)
        elif tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
        return self.tokenizer.images01_to_input(x.to(self.device))

    @torch.no_grad()
    def _tokenize(self, image_indices: np.ndarray, crops: np.ndarray | None = None) -> torch.Tensor:
        """(n, L) token pyramids of images (or of their crops), scales concatenated coarse to fine."""
        return torch.cat(self.tokenizer.img_to_indices(self._load_images(image_indices, crops)), dim=1)

    def _token_table(self) -> dict:
        """Tokens of every training image, computed once by rank 0 into OUT/tokens.safetensors."""
        from safetensors.torch import load_file, save_file

        from mindhier.checkpoint import honour_umask

        path = self.out / "tokens.safetensors"
        wanted = np.unique(self.train.image_indices)
        key = json.dumps(checkpoint_identity(self.tok_meta), sort_keys=True)
        if self.d.is_main:
            fresh = not path.exists() or json.loads(_metadata(path).get("tokenizer", "null")) != json.loads(key)
            if not fresh:
                fresh = not np.array_equal(load_file(str(path))["image_index"].numpy(), wanted)
            if fresh:
                self.out.mkdir(parents=True, exist_ok=True)
                chunks = [wanted[i:i + 64] for i in range(0, len(wanted), 64)]
                rows = [self._tokenize(c).cpu() for c in common.progress(chunks, desc="tokenizing training images")]
                tmp = path.with_name(path.name + ".tmp")  # a run killed while writing leaves no damaged cache
                save_file({"image_index": torch.from_numpy(wanted), "tokens": torch.cat(rows).to(torch.int32)},
                          str(tmp), metadata={"tokenizer": key})
                honour_umask(tmp)  # safetensors writes 0600; the run's other files follow the umask
                os.replace(tmp, path)
        if self.d.enabled:
            torch.distributed.barrier()
        table = load_file(str(path))
        lookup = {int(i): r for r, i in enumerate(table["image_index"].tolist())}
        return {"rows": lookup, "tokens": table["tokens"]}

    def _global_batch(self, step: int) -> tuple[np.ndarray, torch.Tensor]:
        """(trial rows, keep-condition flags) of a step's global batch, from (seed, step) only,
        so 1 and N processes and a resumed run see the same samples."""
        g = torch.Generator().manual_seed(self.args.seed * 1_000_003 + step)
        rows = torch.randint(0, self._num_samples(), (self.args.global_batch,), generator=g).numpy()
        keep = torch.rand(self.args.global_batch, generator=g) >= self.args.cond_drop
        return rows, keep

    def _num_samples(self) -> int:
        return len(self.train)

    def _micro_batches(self, step: int):
        rows, keep = self._global_batch(step)
        per_rank = self.micro * self.accum
        lo = self.d.rank * per_rank
        for m in range(self.accum):
            sl = slice(lo + m * self.micro, lo + (m + 1) * self.micro)
            if self.cropper is None:
                yield self._inputs(rows[sl], keep[sl])
            else:  # crops from (seed, step, slot in the global batch): the same for any process count
                yield self._inputs(rows[sl], keep[sl], crops=self.cropper.offsets(step, range(sl.start, sl.stop)))

    @torch.no_grad()
    def _inputs(self, rows: np.ndarray, keep: torch.Tensor, crops: np.ndarray | None = None):
        voxels = torch.stack([self.train[int(r)]["voxels"] for r in rows]).to(self.device)
        voxels = voxels * keep.to(self.device, voxels.dtype)[:, None]       # CFG: zero voxels before the encoder
        images = self.train.image_indices[rows]
        if self.tokens is not None and crops is None:
            targets = self.tokens["tokens"][[self.tokens["rows"][int(i)] for i in images]].long().to(self.device)
        else:
            targets = self._tokenize(images, crops)
        indices = list(targets.split([pn * pn for pn in self.cfg.scales], dim=1))
        tf_input = self.tokenizer.teacher_forcing_input(indices)
        with self._autocast():
            levels = self.encoder(voxels).levels
        return tf_input, [e.float() for e in levels], targets

    def _autocast(self):
        return common.autocast(self.device, enabled=self.args.precision != "fp32")

    # ---- the loop -------------------------------------------------------------------------
    def fit(self) -> None:
        a, d = self.args, self.d
        if d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            common.trim_log(self.out / "log.jsonl", self.step)   # a fresh run starts it anew, a resumed one at its step
            print(f"{self._describe_data()} | {a.preset} generator {self.model.num_params():,} "
                  f"params, routing {self.cfg.routing} {self.model.routing_table()} | {d.world_size} process(es) "
                  f"({a.parallel if d.enabled else 'single'}) x {self.micro} x {self.accum} accum = batch "
                  f"{a.global_batch}", flush=True)
        stop_at = self.step + a.stop_after if a.stop_after is not None else a.steps
        guard: dict = {}
        bar = common.progress(total=a.steps, initial=self.step, desc="train-generator", enabled=d.is_main)
        while self.step < min(a.steps, stop_at):
            lr = common.warmup_cosine(self.step, a.steps, a.warmup, a.lr)
            common.set_lr(self.optimizer, lr)
            started = time.perf_counter()
            stats = self._optimizer_step(guard)
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", acc=f"{stats['accuracy']:.3f}", lr=f"{lr:.2e}")
            if d.is_main:
                common.append_log(self.out, {"step": self.step, "lr": lr, "seconds": round(time.perf_counter() - started, 4), **stats})
            done = self.step >= min(a.steps, stop_at)
            if done or (a.save_every and self.step % a.save_every == 0):
                self._save()
                if d.is_main:
                    common.plot_curves(self.out)
            if (a.sample_every and self.step % a.sample_every == 0) or self.step == a.steps:
                self._sample_grid()
        bar.close()

    def _describe_data(self) -> str:
        return (f"train-generator: subject {self.args.subject}, {len(self.train)} trials of sessions "
                f"{self.args.sessions or 'all'}, "
                f"{stimuli.describe(self.stimuli)}, crop {self.settings.crop}")

    def _optimizer_step(self, guard: dict) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "accuracy": 0.0}
        for m, (tf_input, levels, targets) in enumerate(self._micro_batches(self.step)):
            last = m == self.accum - 1
            with self._no_sync(not last):
                with self._autocast():
                    logits = self.wrapped(tf_input, levels)
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())  # uniform 1/L
                (loss / self.accum).backward()
            sums["loss"] += float(loss.detach()) / self.accum
            sums["accuracy"] += float((logits.argmax(-1) == targets).float().mean()) / self.accum
        stats = {k: float(all_reduce_mean(torch.tensor(v), self.d)) for k, v in sums.items()}
        if not common.check_finite(torch.tensor(stats["loss"]), self.step, 5, guard):
            self.optimizer.zero_grad(set_to_none=True)
            return {**stats, "grad_norm": math.nan}
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        return {**stats, "grad_norm": float(norm)}

    def _no_sync(self, skip_sync: bool):
        if not self.d.enabled or not skip_sync:
            if self.d.enabled and self.args.parallel == "fsdp":
                self.model.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.args.parallel == "fsdp":
            self.model.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.wrapped.no_sync()

    @torch.no_grad()
    def _sample_grid(self) -> None:
        """Test stimuli over their reconstructions (single-shot) → OUT/samples/step_N.png.

        Every rank samples the same images (per-image seeds make them identical), so the
        collectives FSDP issues inside the blocks match; rank 0 writes the picture."""
        from mindhier.report import image_grid

        n = min(self.args.sample_images, len(self.test))
        fsdp = self.d.enabled and self.args.parallel == "fsdp"
        with (full_weights(self.model) if fsdp else contextlib.nullcontext()):
            self.model.eval()
            voxels = torch.stack([self.test[i]["voxels"] for i in range(n)]).to(self.device)
            ids = [int(i) for i in self.test.image_indices[:n]]
            settings = SamplingSettings(cfg=self.args.sample_cfg, num_candidates=1, seed=self.args.seed)
            with self._autocast():
                cond, null, _ = encode_conditions(self.encoder, self.model, voxels)
                rec = reconstruct(self.model, self.tokenizer, cond, null, settings, ids)
            self.model.train()
        if self.d.is_main:
            truth = self.tokenizer.output_to_images01(self._load_images(np.asarray(ids)))
            (self.out / "samples").mkdir(parents=True, exist_ok=True)
            image_grid([truth.float().cpu().numpy(), rec.single_shot.float().cpu().numpy()], cell=64).save(
                self.out / "samples" / f"step_{self.step:07d}.png")


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}
