"""Pretrain the scale-aware generator on the corpus, conditioned on each image's own vision
hierarchy: the demo's stand-in for Switti, which stage 2 then fine-tunes on fMRI (SPEC §1.4).

    mindhier pretrain-generator --data corpora/demo --vision checkpoints/foundation/vision \\
        --tokenizer checkpoints/foundation/tokenizer --out runs/generator-pretrain
    mindhier pretrain-generator ... --init runs/generator-pretrain/generator --out runs/more   (a warm restart)
    mindhier train-generator ... --init runs/generator-pretrain/generator     (stage 2 from it)

The condition of image x is v_{g_1..g_M}(x), the frozen vision model's features at the layers
the encoder will be aligned to (``--layer-map``), routed scale-aware exactly as the encoder's
e_1..e_M are later, each level rescaled to a mean token norm of 1 (``level_norm``: the
encoder's outputs only match the targets in direction). For classifier-free guidance 10 % of
the samples get the all-zero condition. Everything else — loss, optimiser, FSDP2 across
processes, exact ``--resume``, the sample grid — is the stage-2 loop of ``train-generator``.
Every 50th corpus image is held out; the sample grid shows held-out images.

OUT/generator.{safetensors,json}   model + optimizer (``--resume`` continues exactly)
OUT/samples/step_NNNNNNN.png       held-out images (top) and the generator's drawing of them
OUT/log.jsonl                      loss, token accuracy, lr, gradient norm (one line per step)
OUT/curves.png                     those curves, redrawn at every checkpoint
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch

from mindhier.checkpoint import load_checkpoint
from mindhier.config import get_preset, to_dict
from mindhier.curves import logged_seconds
from mindhier.data import ImageStore, data_manifest
from mindhier.errors import MindhierError
from mindhier.generator import PRESETS, ROUTINGS, GeneratorConfig
from mindhier.generator.pretrained import draw_from_own_features, vision_record
from mindhier.reconstruct import checkpoint_identity
from mindhier.sampling import SamplingSettings
from mindhier.tokenizer import load_tokenizer
from mindhier.train import generator as stage2
from mindhier.train.distributed import distributed_session
from mindhier.vision import LAYER_MAPS, load_vision, scaled_layer_map
from mindhier.world.corpus import held_out_images, is_corpus


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="the pretraining corpus (`mindhier corpus`)")
    p.add_argument("--vision", required=True, help="frozen vision model (train-vision checkpoint)")
    p.add_argument("--tokenizer", required=True, help="frozen tokenizer (train-tokenizer checkpoint)")
    p.add_argument("--layer-map", default="balanced", choices=sorted(LAYER_MAPS),
                   help="which vision layers are the condition's levels (the encoder's, later)")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="generator body")
    p.add_argument("--routing", default="scale-aware", choices=ROUTINGS, help="which level each scale reads")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=6000, help="optimiser steps")
    p.add_argument("--global-batch", type=int, default=32, help="images per step over all processes")
    p.add_argument("--max-micro-batch", type=int, default=None, help="largest per-process forward; above it, accumulate")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (none on biases/norms)")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps, then cosine decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--cond-drop", type=float, default=0.1, help="probability of the all-zero condition (CFG)")
    p.add_argument("--cross-rope", action=argparse.BooleanOptionalAction, default=None,
                   help="2-D RoPE on cross-attention, so each token can find its own patches (default: the "
                        "preset's); --init from a generator without it turns it on (same weights, new tables)")
    p.add_argument("--init", default=None,
                   help="warm restart: start the weights from a generator this command pretrained on the same "
                        "vision model, layers and tokenizer (fresh optimiser and schedule over --steps); the "
                        "steps before are recorded, so the checkpoint says how long it trained in all")
    stage2.add_loop_arguments(p, sample_every=1000, sample_what="held-out corpus images")

def run(args: argparse.Namespace) -> int:
    # The stage-2 loop reads these; pretraining has no subject, no Switti init and tokenizes on the fly.
    args.subject, args.init_switti, args.tokens = 0, None, "on-the-fly"
    with distributed_session(args.device) as d:
        PretrainTrainer(args, d).fit()
    return 0


def earlier_rounds(init_meta: dict, where) -> list[dict]:
    """The rounds before a warm restart from ``init_meta``: its own earlier rounds, then itself
    (steps, batch, peak lr, training seconds), so a checkpoint tells its whole schedule."""
    before = list(init_meta.get("pretrain", {}).get("earlier_rounds", []))
    train = init_meta.get("train", {})
    seconds = logged_seconds(Path(where).parent)
    if seconds is None and init_meta.get("released", {}).get("train_seconds") is not None:  # a release: all rounds
        seconds = init_meta["released"]["train_seconds"] - sum(r.get("train_seconds") or 0 for r in before)
    return before + [{"from": str(where), "steps": init_meta.get("progress", {}).get("step"),
                      "global_batch": train.get("global_batch"), "lr": train.get("lr"), "train_seconds": seconds}]


class PretrainTrainer(stage2.Trainer):
    """``train-generator``'s loop with the corpus and the vision model in place of fMRI."""

    def _load_frozen(self) -> None:
        a = self.args
        if not is_corpus(a.data):
            raise MindhierError(f"{a.data} is not a pretraining corpus (no corpus/corpus.json); write one "
                                "with `mindhier corpus`, or use train-generator for fMRI data")
        self.images = ImageStore(a.data)
        held = held_out_images(self.images.num_images)
        self.train_images = np.setdiff1d(np.arange(self.images.num_images), held)
        self.held_out = held
        self.pixels = torch.from_numpy(self.images.get_uint8(np.arange(self.images.num_images)))  # 12 KB each
        self.vision = load_vision(a.vision, device=self.device).freeze()
        self.layers = scaled_layer_map(a.layer_map, self.vision.num_layers)
        self.tokenizer = load_tokenizer(a.tokenizer, device=self.device).requires_grad_(False)
        self.tok_meta = load_checkpoint(a.tokenizer, kind="tokenizer")[1]
        self.manifest = data_manifest(a.data, subjects=[])

    def _generator_config(self):
        a = self.args
        base = get_preset(PRESETS, a.preset, "generator")
        cfg = dataclasses.replace(
            base, scales=tuple(self.tokenizer.scales), vocab_size=int(self.tokenizer.vocab_size),
            z_channels=int(self.tokenizer.z_channels), context_dim=int(self.vision.feature_dim),
            pooled_dim=int(self.vision.feature_dim), num_levels=len(self.layers),
            tokens_per_level=int(self.vision.num_tokens), routing=a.routing, cond_drop_prob=a.cond_drop,
            level_norm=True, cross_rope=base.cross_rope if a.cross_rope is None else a.cross_rope)
        self.earlier_rounds = []
        if a.init is None:
            return cfg
        self.init_tensors, init_meta = load_checkpoint(a.init, kind="generator")
        self._check_init(init_meta, cfg)
        self.earlier_rounds = earlier_rounds(init_meta, a.init)
        return cfg

    def _check_init(self, init_meta: dict, cfg) -> None:
        """A warm restart continues the same model on the same frozen inputs, nothing else."""
        problems = self._frozen_diffs(init_meta) if "pretrain" in init_meta else [
            "it is not a pretrain-generator checkpoint (a stage-2 generator was trained on fMRI)"]
        stored = {**to_dict(GeneratorConfig()), **init_meta["config"]}  # a field added since: its default
        if cfg.cross_rope:  # switching cross-attention RoPE on is a warm restart too: it adds no weights
            stored["cross_rope"] = True
        if stored != to_dict(cfg):
            problems.append(f"its config differs: {init_meta['config']} (this run: {to_dict(cfg)}); pass the "
                            "--preset, --routing and --cond-drop it was trained with")
        if problems:
            raise MindhierError(f"--init {self.args.init} cannot be continued here:\n  " + "\n  ".join(problems))

    def _meta(self) -> dict:
        return {"tokenizer": checkpoint_identity(self.tok_meta), "tokenizer_path": str(self.args.tokenizer),
                "pretrain": {"corpus": str(self.args.data), "vision": vision_record(self.vision, self.layers),
                             "vision_path": str(self.args.vision), "layer_map": self.args.layer_map,
                             "earlier_rounds": self.earlier_rounds},
                "train": to_dict(self.settings), "data_manifest": self.manifest,
                "progress": {"step": self.step, "world_size": self.d.world_size, "parallel": self.args.parallel}}

    def _frozen_diffs(self, meta: dict) -> list[str]:
        diffs = []
        if meta.get("tokenizer") != checkpoint_identity(self.tok_meta):
            diffs.append(f"tokenizer: the checkpoint was trained with another tokenizer ({meta.get('tokenizer_path')})")
        if meta.get("pretrain", {}).get("vision") != vision_record(self.vision, self.layers):
            diffs.append("vision: the checkpoint was conditioned on another vision model or other layers")
        return diffs

    def _num_samples(self) -> int:
        return len(self.train_images)

    def _describe_data(self) -> str:
        return (f"pretrain-generator: {len(self.train_images)} corpus images, condition = vision layers "
                f"{list(self.layers)} ({self.args.layer_map})")

    def _pictures(self, image_indices: np.ndarray) -> torch.Tensor:
        return self.pixels[torch.from_numpy(np.asarray(image_indices))].float().div(255).to(self.device)

    @torch.no_grad()
    def _levels(self, images01: torch.Tensor) -> list[torch.Tensor]:
        return [v.float() for v in self.vision.image_layer_features(images01, self.layers)]

    @torch.no_grad()
    def _inputs(self, rows: np.ndarray, keep: torch.Tensor):
        images01 = self._pictures(self.train_images[rows])
        targets = torch.cat(self.tokenizer.img_to_indices(self.tokenizer.images01_to_input(images01)), dim=1)
        indices = list(targets.split([pn * pn for pn in self.cfg.scales], dim=1))
        tf_input = self.tokenizer.teacher_forcing_input(indices)
        mask = keep.to(self.device, torch.float32).view(-1, 1, 1)  # CFG: the all-zero condition
        return tf_input, [v * mask for v in self._levels(images01)], targets

    @torch.no_grad()
    def _sample_grid(self) -> None:
        """Held-out corpus images over the generator's drawing of their own features."""
        from mindhier.report import image_grid

        n = min(self.args.sample_images, len(self.held_out))
        ids = [int(i) for i in self.held_out[:n]]
        fsdp = self.d.enabled and self.args.parallel == "fsdp"
        with (stage2.full_weights(self.model) if fsdp else stage2.contextlib.nullcontext()):
            self.model.eval()
            truth = self._pictures(np.asarray(ids))
            settings = SamplingSettings(cfg=self.args.sample_cfg, num_candidates=1, seed=self.args.seed)
            with self._autocast():
                drawn = draw_from_own_features(self.model, self.tokenizer, self.vision, self.layers, truth, ids,
                                               settings, batch=len(ids))
            self.model.train()
        if self.d.is_main:
            (self.out / "samples").mkdir(parents=True, exist_ok=True)
            image_grid([truth.float().cpu().numpy(), drawn.numpy()], cell=64).save(
                self.out / "samples" / f"step_{self.step:07d}.png")

