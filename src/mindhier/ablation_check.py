"""`mindhier ablation-check`: does the released pipeline beat its own ablations by more than
seed noise, as read by the world reader? (issue 18: a regression check that a broken method
cannot pass by staying "close enough" on a few images.)

The first N test images are reconstructed single-shot as the demo does (its CFG), once per seed
in ``SEEDS``, and once (seed 0) under each sampling-time ablation of the conditioning the paper
ablates in training:

  no guidance       CFG 0: the condition without classifier-free guidance
  last level only   every level replaced by e_M (the single-feature condition of Table 2)
  reversed levels   e_M..e_1 given as e_1..e_M (the hierarchy's order broken)
  no routing        every scale cross-attends to all levels (routing "none", Table 4's contrast)

Every image is read by the world reader. A variant's *score* is its mean reader rate over
``SCORED`` (the attributes the demo reads above its ridge floor, README); the method's score is
the mean over the seeds, its *seed spread* the largest minus the smallest seed score. An
ablation is *separated* when the method's score exceeds the ablation's by more than the spread.

    mindhier ablation-check --checkpoints checkpoints/demo --world worlds/demo

writes CHECKPOINTS/ablation_check.json; tests/test_released_checkpoints.py recomputes the method
and checks it lands nearer its recorded score than any separated ablation does.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

ABLATIONS = ("no guidance", "last level only", "reversed levels", "no routing")
SEEDS = (0, 1, 2)
SCORED = ("background_colour", "background_kind", "main_colour")
DEFAULT_IMAGES = 300


def ablate_levels(levels: list[torch.Tensor], variant: str) -> list[torch.Tensor]:
    """The hierarchy e_1..e_M as the variant conditions on it."""
    if variant == "last level only":
        return [levels[-1]] * len(levels)
    if variant == "reversed levels":
        return levels[::-1]
    return levels


def unrouted(generator):
    """The same weights with routing "none": every scale sees every level (masks are buffers)."""
    from mindhier.generator import ScaleAwareGenerator

    free = ScaleAwareGenerator(dataclasses.replace(generator.cfg, routing="none"))
    free.load_state_dict(generator.state_dict())
    return free.to(device=next(generator.parameters()).device, dtype=generator.dtype).eval()


@torch.no_grad()
def draw(pipeline, generator, voxels: torch.Tensor, ids: list[int], variant: str, cfg: float, seed: int,
         batch: int = 16) -> torch.Tensor:
    """Single-shot reconstructions (N, 3, H, W) in [0, 1] of the voxels under ``variant``."""
    from mindhier.pipeline import predict_hierarchy
    from mindhier.runtime import autocast
    from mindhier.sampling import SamplingSettings, reconstruct

    settings = SamplingSettings(cfg=0.0 if variant == "no guidance" else cfg, seed=seed, num_candidates=1)
    device, parts = pipeline.device, []
    with autocast(device, enabled=pipeline.precision != "fp32"):
        null_levels, _ = predict_hierarchy(pipeline.encoder, voxels.new_zeros(1, voxels.shape[-1]).to(device))
        for start in range(0, len(ids), batch):
            v = voxels[start:start + batch].to(device)
            levels, _ = predict_hierarchy(pipeline.encoder, v)
            cond = generator.condition(ablate_levels(levels, variant))
            null = generator.condition(ablate_levels([e.expand(len(v), -1, -1) for e in null_levels], variant))
            rec = reconstruct(generator, pipeline.tokenizer, cond, null, settings, ids[start:start + batch])
            parts.append(rec.single_shot.float().cpu())
    return torch.cat(parts)


def read_rates(reader, images: torch.Tensor, truth: dict[str, np.ndarray]) -> dict[str, dict]:
    """The world reader's rate (with its 95 % interval) per attribute on ``images``."""
    from mindhier.world import reader as R

    device = next(reader.parameters()).device
    return {k: {"rate": v["rate"], "low": v["low"], "high": v["high"]}
            for k, v in R.rates(R.read(reader, images.to(device)), truth).items()}


def score(rates: dict[str, dict]) -> float:
    return float(np.mean([rates[k]["rate"] for k in SCORED]))


def images_sha256(images: torch.Tensor) -> str:
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()


def held_out_inputs(world: Path, subject: int, limit: int) -> tuple[torch.Tensor, list[int], dict[str, np.ndarray]]:
    """(averaged test voxels, their image ids, the world's labels of those images), first ``limit``."""
    from mindhier.data import TestSet
    from mindhier.world.corpus import world_labels

    test = TestSet(world, subject, policy="average")
    n = min(limit, len(test))
    voxels = torch.stack([test[i]["voxels"] for i in range(n)])
    ids = [int(test.image_indices[i]) for i in range(n)]
    labels = world_labels(world)
    return voxels, ids, {k: v[ids] for k, v in labels.items()}


def ablation_check(checkpoints: Path, world: Path, reader_path: Path, *, subject: int = 1, cfg: float = 3.0,
                   limit: int = DEFAULT_IMAGES, device: str = "auto") -> dict:
    """The method's and each ablation's reader rates and scores, the seed spread and the verdicts."""
    from mindhier.pipeline import Pipeline
    from mindhier.runtime import platform_fingerprint
    from mindhier.world import reader as R

    pipeline = Pipeline.from_checkpoints(checkpoints / "encoder", checkpoints / "tokenizer",
                                         checkpoints / "generator", subject=subject, device=device)
    reader, _ = R.load_reader(reader_path, pipeline.device)
    voxels, ids, truth = held_out_inputs(world, subject, limit)

    def rates_of(images):
        return read_rates(reader, images, truth)

    seeds = {}
    for seed in SEEDS:
        images = draw(pipeline, pipeline.generator, voxels, ids, "method", cfg, seed)
        seeds[seed] = {"rates": rates_of(images), "images_sha256": images_sha256(images)}
    seed_scores = [score(s["rates"]) for s in seeds.values()]
    method, spread = float(np.mean(seed_scores)), float(max(seed_scores) - min(seed_scores))
    ablations = {}
    for variant in ABLATIONS:
        generator = unrouted(pipeline.generator) if variant == "no routing" else pipeline.generator
        rates = rates_of(draw(pipeline, generator, voxels, ids, variant, cfg, seed=0))
        ablations[variant] = {"rates": rates, "score": score(rates), "separation": method - score(rates),
                              "separated": method - score(rates) > spread}
    return {"images": len(ids), "subject": subject, "cfg": cfg, "scored": list(SCORED), "seeds": list(SEEDS),
            "method": {"score": method, "seed_scores": seed_scores, "seed_spread": spread,
                       "by_seed": {str(k): v for k, v in seeds.items()}},
            "ablations": ablations, "platform": platform_fingerprint(), "checkpoints": str(checkpoints),
            "command": f"mindhier ablation-check --checkpoints {checkpoints} --cfg {cfg} --limit {limit}"}


def summary(result: dict) -> str:
    m = result["method"]
    lines = [f"method (CFG {result['cfg']}, {result['images']} images, mean reader rate over "
             f"{', '.join(result['scored'])}): {m['score']:.3f}, seed spread {m['seed_spread']:.3f}"]
    for name, a in result["ablations"].items():
        verdict = "separated" if a["separated"] else "NOT separated (within seed noise)"
        lines.append(f"  {name:16s} {a['score']:.3f}  method − ablation {a['separation']:+.3f}  {verdict}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoints", default="checkpoints/demo", help="encoder, tokenizer, generator folder")
    p.add_argument("--world", default="worlds/demo", help="the fMRI world whose test set is reconstructed")
    p.add_argument("--reader", default="checkpoints/foundation/reader", help="the world reader checkpoint")
    p.add_argument("--subject", type=int, default=1, help="NSD subject number")
    p.add_argument("--cfg", type=float, default=3.0, help="the method's guidance (the demo's)")
    p.add_argument("--limit", type=int, default=DEFAULT_IMAGES, help="the first N test images")
    p.add_argument("--out", default=None, help="output JSON (default: CHECKPOINTS/ablation_check.json)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT (the release's record)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")


def run(args: argparse.Namespace) -> int:
    from mindhier.errors import MindhierError

    checkpoints = Path(args.checkpoints)
    out = Path(args.out) if args.out else checkpoints / "ablation_check.json"
    if out.exists() and not args.force:
        raise MindhierError(f"{out} exists (a recorded check the release test compares with); pass --force "
                            "to replace it, or --out elsewhere")
    result = ablation_check(checkpoints, Path(args.world), Path(args.reader), subject=args.subject, cfg=args.cfg,
                            limit=args.limit, device=args.device)
    out.write_text(json.dumps(result, indent=2, sort_keys=True))
    print(summary(result))
    print(f"wrote {out}")
    return 0
