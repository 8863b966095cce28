"""Stage 1: train the Hierarchical fMRI Encoder with hierarchy-to-hierarchy alignment.

Each level e_m of the encoder is pulled towards the vision layer v_{g_m} (paper Eq. 1) and the
final image/text outputs towards CLIP's final layer and caption tokens (Eq. 2, SoftCLIP).
Vision targets are computed once into an on-disk cache (next to --out unless --target-cache).
The text target rotates over each image's first three captions by step as the official code
does (--captions, mindhier.encoder.targets); the text MSE's weight is --text-mse-weight
(mindhier.encoder.losses.LossConfig). Both are recorded with the run's settings.

  mindhier train-encoder --data worlds/demo --subject 1 --vision runs/vision-demo --out runs/encoder
  torchrun --standalone --nproc_per_node=2 -m mindhier train-encoder ...   (DDP, same flags)

--global-batch is the batch the optimiser sees whatever the number of processes; per-process
micro batches and gradient accumulation are derived from it. SoftCLIP's negatives are the other
samples of the same micro batch. After every epoch the encoder is scored on the test images
(their repetitions used as --averaging says): per-level cosine to its vision layer, and two-way
identification and top-1 retrieval of the predicted image embedding. --sessions trains on some
scan sessions only (mindhier.train.sessions; the paper's one-session setting is --sessions 1);
--init starts from another encoder, of this or another subject (docs/new_subject.md). The
checkpoint (OUT/encoder.safetensors + .json) carries optimizer and RNG state, so --resume
continues exactly where a run stopped. Every step's loss (and its parts), learning rate and
gradient norm go to OUT/log.jsonl, each epoch's test scores to OUT/metrics.jsonl, and both are
drawn into OUT/curves.png at every checkpoint (`mindhier curves OUT` redraws it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from mindhier.checkpoint import (
    check_config, load_checkpoint, load_state_strict, optimizer_from_tensors, optimizer_to_tensors,
    paths_for, save_checkpoint,
)
from mindhier.config import diff_configs, get_preset, to_dict
from mindhier.data import DataError, SubjectIndex, TestSet, averaging
from mindhier.data.manifest import data_manifest, diff_manifests
from mindhier.encoder import (
    PRESETS, SUPERVISIONS, HierarchicalFMRIEncoder, VisionShape, encode_repetitions, encoder_loss,
    flat_cosine, predicted_embedding, top1_retrieval, two_way_identification,
)
from mindhier.encoder.io import KIND, check_voxels, model_tensors, start_from
from mindhier.encoder.losses import LOSS_PRESETS, LossConfig
from mindhier.encoder.targets import (
    CAPTION_MODES, LAYER_MAP_CHOICES, MissingTargetsError, cached_text_variants, caption_variant,
    check_cached_layers, layer_map, required_keys, text_variant_name,
)
from mindhier.errors import MindhierError
from mindhier.train import common, recipes, sessions
from mindhier.train.distributed import Dist, all_reduce_mean, distributed_session, split_global_batch

CHECKPOINT = "encoder"
IN_MEMORY_LIMIT = 2 * 2**30  # read the whole target cache into RAM below this file size


@dataclass(frozen=True)
class TrainSettings:
    """Everything about a run besides the model shape; saved in the checkpoint and compared on
    --resume, because changing any of it midway would make the result another experiment."""

    subject: int
    nsd_sessions: tuple[int, ...] | None  # --sessions, numbered from 1 (None: all); mindhier.train.sessions
    epochs: int
    global_batch: int
    lr: float
    weight_decay: float
    warmup: float
    seed: int
    layer_map: str
    layers: tuple[int, ...]
    final_layer: int
    precision: str
    captions: str  # text target's caption rule, CAPTION_MODES (mindhier.encoder.targets)
    loss: LossConfig  # loss weights (mindhier.encoder.losses)
    averaging: str = averaging.DEFAULT  # test repetitions of the held-out scores (mindhier.data.averaging)
    init: str | None = None  # --init: the encoder checkpoint this run started from


# What checkpoints written before a setting existed trained with (compared on --resume).
LEGACY_TRAIN = {"captions": "fixed", "loss": {"text_mse_weight": 1.0}, "averaging": averaging.DEFAULT,
                "init": None}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="data folder in MindEye2 layout (a world or prepared NSD)")
    p.add_argument("--subject", type=int, default=1, help="NSD subject number")
    sessions.add_argument(p)
    p.add_argument("--vision", required=True,
                   help="frozen vision model: a train-vision output (folder or checkpoint) or a local HF CLIP folder")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="encoder size")
    p.add_argument("--out", required=True, help="output folder (checkpoint, log.jsonl, metrics.jsonl, curves.png)")
    p.add_argument("--epochs", type=int, default=None,
                   help=recipes.recipe_help("encoder", "epochs", "passes over every training trial"))
    p.add_argument("--global-batch", type=int, default=None,
                   help=recipes.recipe_help("encoder", "global_batch", "samples per optimiser step, all processes together"))
    p.add_argument("--max-micro-batch", type=int, default=None,
                   help="largest per-process batch in memory; larger ones are split and accumulated")
    p.add_argument("--lr", type=float, default=None, help=recipes.recipe_help("encoder", "lr", "peak learning rate"))
    p.add_argument("--weight-decay", type=float, default=None,
                   help=recipes.recipe_help("encoder", "weight_decay", "AdamW weight decay (none on biases/norms)"))
    p.add_argument("--warmup", type=float, default=None,
                   help=recipes.recipe_help("encoder", "warmup", "warmup as a fraction of all steps, then cosine decay"))
    recipes.add_recipe_argument(p, "encoder")
    p.add_argument("--supervision", default="hierarchical", choices=SUPERVISIONS,
                   help="paper Table 2: every level (full), final level only, or a single feature")
    p.add_argument("--layer-map", default="default", choices=LAYER_MAP_CHOICES,
                   help="vision layers g_m (paper Table 3), scaled to the vision model's depth")
    p.add_argument("--tau", type=float, default=None, help="SoftCLIP temperature (default: the preset's, 0.005)")
    p.add_argument("--captions", default="rotate", choices=CAPTION_MODES,
                   help="text target: 'rotate' = caption (step in epoch) %% 3 of each image, the official "
                        "code's prompts[train_i %% 3]; 'fixed' = always caption (image index) %% 3")
    p.add_argument("--text-mse-weight", type=float, default=None,
                   help="weight of the text MSE relative to the image MSE terms (default: the preset's; "
                        "paper 257/77 = the official code's 200000 * mean-MSE, demo/tiny 1 = the paper's sum)")
    p.add_argument("--init", default=None, metavar="ENCODER",
                   help="start from this train-encoder checkpoint (same --preset and vision model): every weight, "
                        "except the subject-specific voxel input layer when it was trained on another subject "
                        "(the new-subject recipe, docs/new_subject.md); fresh optimiser and schedule")
    averaging.add_argument(p, "the held-out scores after every epoch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32"),
                   help="auto: bf16 autocast where the device runs it fast; fp32: never")
    p.add_argument("--target-cache", default=None, help="folder for cached vision targets (default: OUT/../targets)")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: at epoch ends)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps in this invocation; continue with --resume")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint in --out")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")


def run(args: argparse.Namespace) -> int:
    with distributed_session(args.device) as d:
        Trainer(args, d).fit()
    return 0


class Trainer:
    def __init__(self, args: argparse.Namespace, d: Dist):
        recipes.resolve(args, "encoder")  # the schedule flags left out take the --recipe's values
        self.args, self.d, self.device = args, d, d.device
        self.out = Path(args.out)
        self.ckpt = self.out / CHECKPOINT
        self._check_output()
        common.seed_everything(args.seed)
        self._load_data()
        self._load_targets()
        self._build_model()

    # ---- setup ------------------------------------------------------------------------------
    def _check_output(self) -> None:
        saved = paths_for(self.ckpt)[1]  # the .json is a save's commit (its weights may still be a temp file)
        if self.args.resume and not saved.exists():
            raise MindhierError(f"--resume: no checkpoint {saved}; start without --resume")
        if saved.exists() and not (self.args.resume or self.args.force):
            raise MindhierError(f"{saved} exists; pass --resume to continue that run or --force to start over")

    def _load_data(self) -> None:
        a = self.args
        index = SubjectIndex(a.data, a.subject)
        self.train = sessions.training_trials(a.data, a.subject, sessions.parse(a.sessions), index)
        self.test = TestSet(a.data, a.subject, policy=averaging.dataset_policy(a.averaging), index=index,
                            expected_voxels=self.train.num_voxels)
        self.num_voxels = self.train.num_voxels
        self.manifest = data_manifest(a.data, [a.subject], sessions=sessions.trained_on(self.train))
        if len(self.train) < a.global_batch:
            raise MindhierError(f"subject {a.subject} has {len(self.train)} training trials, fewer than "
                                f"--global-batch {a.global_batch}; lower the batch")

    def _load_targets(self) -> None:
        from mindhier.vision import load_vision

        a = self.args
        vision = load_vision(a.vision).freeze()
        self.shape = VisionShape.of(vision)
        self.layers = layer_map(a.layer_map, vision.num_layers, vision.default_layers)
        self.final_layer = vision.num_layers
        self.vision_info = {"identity": vision.identity(), "shape": dataclasses.asdict(self.shape),
                            "layers": list(self.layers), "final_layer": self.final_layer,
                            "layer_map": a.layer_map, "path": str(a.vision)}
        cache_dir = Path(a.target_cache) if a.target_cache else self.out.parent / "targets"
        if self.d.is_main:  # one process computes; the others open what it wrote
            cache = self._open_cache(vision, cache_dir)
        _barrier(self.d)
        if not self.d.is_main:
            cache = self._open_cache(vision, cache_dir)
        check_cached_layers(cache.layers, self.layers, self.final_layer, str(cache.path))
        if not cache.has_text:
            raise MissingTargetsError(f"{cache.path} has no text targets; rebuild it with captions")
        self.cache, self.target_names = cache, required_keys(self.layers, self.final_layer)
        self.text_variants = self._open_text_variants(vision, cache_dir) if a.captions == "rotate" else None
        del vision

    def _open_text_variants(self, vision, cache_dir: Path):
        """The text tokens of captions 0..2 of every training image ("rotate"; one process builds)."""
        open_it = lambda: cached_text_variants(vision, self.args.data, self.train.image_indices, cache_dir)
        variants = open_it() if self.d.is_main else None
        _barrier(self.d)
        if variants is None:
            variants = open_it()
        return self._maybe_in_memory(variants)

    def _open_cache(self, vision, cache_dir: Path):
        """A cache of every image (as train-vision or an earlier run may have left) when there is
        one; else one for just this subject's images (NSD has 73k images, a subject sees 10k)."""
        from mindhier.vision.targets import TargetCache, cache_key, cache_path, cached_targets

        layers = sorted(set(self.layers) | {self.final_layer})
        images = np.union1d(self.train.image_indices, self.test.image_indices)
        whole = cache_path(vision, layers, cache_dir)
        if whole.is_file():
            cache = TargetCache(whole, expect_key=cache_key(vision, layers, True))
            if np.isin(images, cache.image_indices).all():
                return self._maybe_in_memory(cache)
        cache = cached_targets(vision, self.args.data, layers, cache_dir, image_indices=images,
                               with_text=True, show_progress=self.d.is_main)
        return self._maybe_in_memory(cache)

    @staticmethod
    def _maybe_in_memory(cache):
        if cache.path.stat().st_size < IN_MEMORY_LIMIT:
            return type(cache)(cache.path, expect_key=cache.key, in_memory=True)
        return cache

    def _build_model(self) -> None:
        a = self.args
        cfg = get_preset(PRESETS, a.preset, "encoder")
        cfg = dataclasses.replace(cfg, supervision=a.supervision, tau=a.tau if a.tau is not None else cfg.tau)
        self.cfg = cfg
        loss = get_preset(LOSS_PRESETS, a.preset, "encoder loss")
        if a.text_mse_weight is not None:
            loss = dataclasses.replace(loss, text_mse_weight=a.text_mse_weight)
        self.settings = TrainSettings(
            subject=a.subject, nsd_sessions=sessions.parse(a.sessions), epochs=a.epochs,
            global_batch=a.global_batch, lr=a.lr, weight_decay=a.weight_decay, warmup=a.warmup,
            seed=a.seed, layer_map=a.layer_map, layers=tuple(self.layers), final_layer=self.final_layer,
            precision=a.precision, captions=a.captions, loss=loss, averaging=a.averaging, init=a.init,
        )
        self.model = HierarchicalFMRIEncoder(cfg, self.num_voxels, self.shape).to(self.device)
        self.init_record = None  # what --init loaded (a resumed run reads it from its checkpoint)
        if a.init and not a.resume:
            self.init_record = start_from(a.init, self.model, a.subject, self.vision_info)
            if self.d.is_main:
                fresh = ", ".join(self.init_record["reinitialised"]) or "none"
                print(f"starting from the encoder {a.init} (subject {self.init_record['subject']}); "
                      f"re-initialised: {fresh}", flush=True)
        self.optimizer = common.adamw(self.model, a.lr, a.weight_decay)
        self.micro, self.accum = split_global_batch(a.global_batch, self.d.world_size, a.max_micro_batch)
        self.sampler = DistributedSampler(self.train, num_replicas=self.d.world_size, rank=self.d.rank,
                                          shuffle=True, seed=a.seed, drop_last=True)
        self.steps_per_epoch = self.sampler.num_samples // (self.micro * self.accum)
        self.total_steps = self.steps_per_epoch * a.epochs
        self.warmup_steps = max(1, round(a.warmup * self.total_steps))
        self.step, self.epoch_sums = 0, {}
        if a.resume:
            self._restore()
        # Per-rank dropout streams (after any restore, the restored state wins: see _restore).
        if not a.resume:
            torch.manual_seed(a.seed + 1 + self.d.rank)
        self.ddp = self.model
        if self.d.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    # ---- checkpoints ------------------------------------------------------------------------
    def _meta(self, epoch: int) -> dict:
        return {
            "num_voxels": self.num_voxels, "subject": self.args.subject,
            "nsd_sessions": sessions.trained_on(self.train), "init": self.init_record,
            "vision": self.vision_info, "train": to_dict(self.settings),
            "recipe": {"name": self.args.recipe, "sources": self.args.recipe_sources},
            "data_manifest": self.manifest,
            "progress": {"step": self.step, "epoch": epoch, "total_steps": self.total_steps,
                         "world_size": self.d.world_size, "epoch_sums": self.epoch_sums},
        }

    def _save(self, epoch: int) -> None:
        rng = common.gather_rng(self.d)
        if not self.d.is_main:
            return
        tensors = dict(self.model.state_dict())
        optim_tensors, optim_info = optimizer_to_tensors(self.optimizer)
        tensors.update(optim_tensors)
        tensors.update(rng)
        meta = self._meta(epoch)
        meta["optimizer"] = optim_info
        save_checkpoint(self.ckpt, tensors, kind=KIND, config=self.cfg, extra=meta)
        common.plot_curves(self.out)

    def _restore(self) -> None:
        tensors, meta = load_checkpoint(self.ckpt, kind=KIND)
        where = paths_for(self.ckpt)[1]
        check_voxels(meta, self.num_voxels, self.args.subject, where)
        check_config(meta, self.cfg, where)
        saved = sessions.legacy_settings(meta.get("train", {}))
        diffs = diff_configs(to_dict(self.settings), {**LEGACY_TRAIN, **saved})
        if diffs:
            raise MindhierError(f"--resume: {where} was trained with other settings:\n  " + "\n  ".join(diffs)
                                + "\nRerun with the same flags (an older run: --captions fixed "
                                "--text-mse-weight 1), or start a new run in another --out.")
        changed = diff_manifests(meta.get("data_manifest", {}), self.manifest)
        if changed:
            raise MindhierError(f"--resume: the data in {self.args.data} changed since {where} was written: "
                                + "; ".join(changed[:5]))
        load_state_strict(self.model, model_tensors(tensors), where)
        optimizer_from_tensors(self.optimizer, tensors, meta["optimizer"])
        self.step = int(meta["progress"]["step"])
        self.epoch_sums = dict(meta["progress"].get("epoch_sums", {}))
        self.init_record = meta.get("init")
        common.restore_rng(tensors, self.d, int(meta["progress"]["world_size"]), self.args.seed + 1 + self.d.rank)
        if self.d.is_main:
            print(f"resumed {where} at step {self.step}/{self.total_steps}", flush=True)

    # ---- training ---------------------------------------------------------------------------
    def fit(self) -> None:
        a, d = self.args, self.d
        if d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for log in ("log.jsonl", "metrics.jsonl"):   # a fresh run starts them anew, a resumed one at its step
                common.trim_log(self.out / log, self.step)
            n_params = sum(p.numel() for p in self.model.parameters())
            print(f"train-encoder: subject {a.subject}, {len(self.train)} trials of sessions {a.sessions or 'all'}, "
                  f"{self.num_voxels} voxels, {len(self.test)} test images ({a.averaging} averaged) | {a.preset} "
                  f"encoder {n_params:,} params, {a.supervision} supervision, vision layers {list(self.layers)} "
                  f"(+final {self.final_layer}), captions {a.captions}, text MSE weight "
                  f"{self.settings.loss.text_mse_weight:.4g} | "
                  f"{d.world_size} process(es) x {self.micro} x {self.accum} accum = batch {a.global_batch}, "
                  f"{self.steps_per_epoch} steps/epoch", flush=True)
        stop_at = self.step + a.stop_after if a.stop_after is not None else None
        guard: dict = {}
        while self.step < self.total_steps:
            epoch = self.step // self.steps_per_epoch
            started = time.perf_counter()
            stats = self._train_epoch(epoch, stop_at, guard)
            seconds = time.perf_counter() - started
            finished_epoch = self.step % self.steps_per_epoch == 0
            if finished_epoch:
                self._end_of_epoch(epoch, stats, seconds)
            self._save(epoch + 1 if finished_epoch else epoch)
            if stop_at is not None and self.step >= stop_at:
                break

    def _batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's micro batches of one epoch, in order (same on every resume)."""
        self.sampler.set_epoch(epoch)
        order = np.fromiter(iter(self.sampler), dtype=np.int64)
        n = self.steps_per_epoch * self.accum
        return [order[i * self.micro:(i + 1) * self.micro] for i in range(n)]

    def _train_epoch(self, epoch: int, stop_at: int | None, guard: dict) -> dict:
        self.ddp.train()
        batches = self._batches(epoch)
        first = self.step - epoch * self.steps_per_epoch
        if first == 0:
            self.epoch_sums = {}
        bar = common.progress(total=self.steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{self.args.epochs}",
                              enabled=self.d.is_main)
        for k in range(first, self.steps_per_epoch):
            lr = common.warmup_cosine(self.step, self.total_steps, self.warmup_steps, self.args.lr)
            common.set_lr(self.optimizer, lr)
            parts, gnorm = self._optimizer_step(batches[k * self.accum:(k + 1) * self.accum], k, guard)
            counts = {**parts, "steps": 1} if parts else {"skipped": 1}  # a skipped step adds no loss
            for key, value in counts.items():
                self.epoch_sums[key] = self.epoch_sums.get(key, 0.0) + value
            self.step += 1
            if self.d.is_main:
                common.append_log(self.out, {"step": self.step, "epoch": epoch + 1, "lr": lr, "grad_norm": gnorm,
                                             **(parts or {"skipped": True})})
            bar.update(1)
            bar.set_postfix(loss=f"{parts.get('loss', math.nan):.4f}", lr=f"{lr:.2e}", gnorm=f"{gnorm:.3f}")
            if self.args.save_every and self.step % self.args.save_every == 0 and k + 1 < self.steps_per_epoch:
                self._save(epoch)
            if stop_at is not None and self.step >= stop_at:
                break
        bar.close()
        steps = max(1, self.epoch_sums.get("steps", 0))
        return {key: value if key == "skipped" else value / steps
                for key, value in self.epoch_sums.items() if key != "steps"}

    def _optimizer_step(self, micro_batches: list[np.ndarray], step_in_epoch: int, guard: dict) -> tuple[dict, float]:
        """One optimiser step over ``accum`` micro batches: (mean loss parts over ranks, grad
        norm), or ({}, nan) when the loss was not finite and the step was skipped."""
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        skip = False
        for i, rows in enumerate(micro_batches):
            voxels, targets = self._batch(rows, step_in_epoch)
            last = i == len(micro_batches) - 1
            sync = self.ddp.no_sync() if self.d.enabled and not last else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    out = self.ddp(voxels)
                loss, parts = encoder_loss(out, targets, self.layers, self.final_layer, self.cfg, self.settings.loss)
                finite = float(all_reduce_mean(torch.isfinite(loss).float(), self.d)) == 1.0
                if not common.check_finite(loss if finite else loss.new_tensor(math.nan), self.step, 5, guard):
                    skip = True
                    break
                (loss / len(micro_batches)).backward()
            for key, value in {"loss": float(loss.detach()), **parts}.items():
                totals[key] = totals.get(key, 0.0) + value / len(micro_batches)
        if skip:  # every rank skips together (the finiteness flag was reduced over ranks)
            self.optimizer.zero_grad(set_to_none=True)
            return {}, math.nan
        gnorm = common.grad_norm(self.model)
        self.optimizer.step()
        means = all_reduce_mean(torch.tensor(list(totals.values()), dtype=torch.float64, device=self.device), self.d).tolist()
        return dict(zip(totals, means)), gnorm

    def _batch(self, rows: np.ndarray, step_in_epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        voxels = torch.stack([self.train[int(i)]["voxels"] for i in rows])
        if not torch.isfinite(voxels).all():
            bad = [int(self.train.trials[int(i)]) for i, v in zip(rows, voxels) if not torch.isfinite(v).all()]
            raise DataError(f"subject {self.args.subject}: betas rows {bad[:5]} contain NaN/inf; "
                            "re-prepare the data (`mindhier prepare-nsd --force`) or mask those voxels")
        targets = self._targets(self.train.image_indices[rows], step_in_epoch)
        return voxels.to(self.device), {k: v.to(self.device) for k, v in targets.items()}

    def _targets(self, images: np.ndarray, step_in_epoch: int) -> dict[str, torch.Tensor]:
        """Vision targets of ``images``; the text one per --captions (mindhier.encoder.targets)."""
        if self.text_variants is None:
            return self.cache.rows_for(images, names=self.target_names)
        targets = self.cache.rows_for(images, names=[n for n in self.target_names if n != "text"])
        name = text_variant_name(caption_variant(step_in_epoch))
        targets["text"] = self.text_variants.rows_for(images, names=[name])[name]
        return targets

    def _autocast(self):
        return common.autocast(self.device, enabled=self.args.precision != "fp32")

    # ---- evaluation -------------------------------------------------------------------------
    def _end_of_epoch(self, epoch: int, stats: dict, seconds: float) -> None:
        if self.d.is_main:
            started = time.perf_counter()
            scores = evaluate(self.model, self.test, self.cache, self.layers, self.final_layer,
                              self.device, self._autocast)
            record = {"epoch": epoch + 1, "step": self.step, "seconds_train": round(seconds, 3),
                      "seconds_eval": round(time.perf_counter() - started, 3),
                      "train": {k: round(v, 6) for k, v in stats.items()}, "test": scores}
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            cos = " ".join(f"{scores[f'cosine_e{m + 1}']:.3f}" for m in range(len(self.layers)))
            print(f"epoch {epoch + 1}: loss {stats.get('loss', math.nan):.4f} | test cosine e1..eM {cos} "
                  f"final {scores['cosine_final']:.3f} | 2-way {scores['two_way']:.3f} top-1 {scores['top1']:.3f} "
                  f"(chance {1 / scores['n_test']:.3f}) | {seconds:.1f} s", flush=True)
        _barrier(self.d)


@torch.no_grad()
def evaluate(model, test, cache, layers, final_layer, device, autocast=None, chunk: int = 64) -> dict:
    """Test-set scores of ``model`` (see mindhier.encoder.metrics); chunked so that paper-size
    targets (1000 images × 257 × 768 per layer) never sit in memory at once."""
    was_training = model.training
    model.eval()
    cos = {f"cosine_e{m + 1}": [] for m in range(len(layers))}
    cos["cosine_final"] = []
    pred, target = [], []
    names = [f"layer_{g}" for g in layers] + [f"layer_{final_layer}", "final_embedding"]
    for start in range(0, len(test), chunk):
        idx = range(start, min(len(test), start + chunk))
        voxels = torch.stack([test[i]["voxels"] for i in idx]).to(device)
        targets = cache.rows_for(test.image_indices[start:start + len(idx)], names=sorted(set(names)))
        with (autocast() if autocast else contextlib.nullcontext()):
            out = encode_repetitions(model, voxels)  # (B, V), or (B, 3, V) with outputs averaged
        for m, g in enumerate(layers):
            cos[f"cosine_e{m + 1}"].append(flat_cosine(out.levels[m], targets[f"layer_{g}"].to(device)).cpu())
        cos["cosine_final"].append(flat_cosine(out.image_final, targets[f"layer_{final_layer}"].to(device)).cpu())
        pred.append(predicted_embedding(out).float().cpu())
        target.append(targets["final_embedding"])
    model.train(was_training)
    scores = {k: round(float(torch.cat(v).mean()), 6) for k, v in cos.items()}
    pred, target = torch.cat(pred), torch.cat(target)
    scores.update(two_way=round(two_way_identification(pred, target), 6),
                  top1=round(top1_retrieval(pred, target), 6), n_test=len(test))
    return scores


# ---- small helpers ----------------------------------------------------------------------------
def _barrier(d: Dist) -> None:
    if d.enabled:
        torch.distributed.barrier()
