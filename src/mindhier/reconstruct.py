"""``mindhier reconstruct``: test-set reconstructions from fMRI (paper §3.3, SPEC §5).

The frozen encoder turns each test image's voxels (repetitions averaged, MindHier's policy) into
the hierarchy e_1..e_M; the generator samples the token pyramid scale by scale under scale-aware
guidance (CFG against the encoder's output for all-zero voxels); the tokenizer decodes it.

    mindhier reconstruct --data worlds/demo --subject 1 --encoder runs/encoder/encoder \\
        --tokenizer runs/tokenizer/tokenizer --generator runs/generator/generator --out runs/recons
    torchrun --standalone --nproc_per_node=2 -m mindhier reconstruct ...   (same images, faster)

Every image is seeded from (--seed, its image index, candidate), so the output does not depend
on --batch or on the number of processes. With --candidates N > 1 (paper: 4) each image gets N
candidates ranked by the cosine similarity of their vision embedding to the encoder's
*predicted* embedding (never the ground truth); both the single-shot (candidate 0) and the
best-of-N results are written and labelled.

OUT/recons.safetensors          key "recons": (N, 3, H, W) in [0, 1], ascending image index
                                (best-of-N when N > 1; MindEye2-compatible), plus "image_index"
OUT/recons_single-shot.safetensors   the single-shot set (when N > 1)
OUT/images/IMAGE.png            one PNG per test image (the primary set)
OUT/coarse_to_fine/IMAGE.png    the picture after every scale, for the first --coarse-to-fine images
OUT/settings.json               checkpoints, split, averaging policy, sampling settings, seeds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from mindhier.checkpoint import load_checkpoint, load_state_strict, paths_for
from mindhier.config import from_dict
from mindhier.errors import MindhierError
from mindhier.generator import GeneratorConfig, ScaleAwareGenerator
from mindhier.runtime import autocast, bf16_is_fast, distributed_session
from mindhier.sampling import Reconstructions, SamplingSettings, reconstruct

GENERATOR_KIND = "generator"
TRAINING_PREFIXES = ("optim.",)


class MismatchError(MindhierError, ValueError):
    """Checkpoints that were not trained together, or data of another subject."""


# ---------------------------------------------------------------------------------------------
# The frozen stage-2 stack: encoder + tokenizer + generator, and whether they belong together
# ---------------------------------------------------------------------------------------------

def checkpoint_identity(meta: dict) -> dict:
    """What identifies a checkpoint without hashing gigabytes: its kind, config hash, creation
    time and code commit (all recorded in its JSON when it was written)."""
    return {k: meta.get(k) for k in ("kind", "config_hash", "created", "git_commit")}


def generator_config_for(base: GeneratorConfig, encoder, tokenizer, **changes) -> GeneratorConfig:
    """``base`` with the interface fields taken from the frozen models: the tokenizer's schedule,
    vocabulary and latent width; the encoder's level count, tokens per level and token width."""
    return dataclasses.replace(
        base, scales=tuple(tokenizer.scales), vocab_size=int(tokenizer.vocab_size),
        z_channels=int(tokenizer.z_channels), context_dim=int(encoder.vision.feature_dim),
        pooled_dim=int(encoder.vision.feature_dim), num_levels=int(encoder.cfg.num_levels),
        tokens_per_level=int(encoder.vision.num_tokens), **changes)


def load_generator(path, device="cpu") -> tuple[ScaleAwareGenerator, dict]:
    """(generator in eval mode, metadata) from a ``mindhier train-generator`` checkpoint."""
    tensors, meta = load_checkpoint(path, kind=GENERATOR_KIND)
    model = ScaleAwareGenerator(from_dict(GeneratorConfig, meta["config"]))
    load_state_strict(model, {k: v for k, v in tensors.items() if not k.startswith(TRAINING_PREFIXES)},
                      paths_for(path)[0])
    return model.to(device).eval(), meta


def check_belongs(gen_meta: dict, enc_meta: dict, tok_meta: dict, paths: dict) -> None:
    """Refuse an encoder or tokenizer other than the ones the generator was trained with."""
    for role, meta in (("encoder", enc_meta), ("tokenizer", tok_meta)):
        expected = gen_meta.get(role)
        if expected is None:
            continue
        found = checkpoint_identity(meta)
        if expected != found:
            diffs = ", ".join(f"{k}: trained with {expected.get(k)!r}, given {found.get(k)!r}"
                              for k in expected if expected.get(k) != found.get(k))
            raise MismatchError(
                f"{paths[role]} is not the {role} the generator {paths['generator']} was trained with "
                f"({diffs}); pass the {role} checkpoint named in {paths_for(paths['generator'])[1]}")


@torch.no_grad()
def encode_conditions(encoder, generator: ScaleAwareGenerator, voxels: torch.Tensor):
    """(condition, null condition, predicted image embedding) for a batch of voxels (B, V).

    The null condition is the encoder's output for all-zero voxels (SPEC §5): the input the
    generator saw for the 10 % of training samples whose voxels were dropped."""
    from mindhier.encoder import predicted_embedding

    out = encoder(voxels)
    null = encoder(torch.zeros_like(voxels[:1]))
    B = voxels.shape[0]
    null_levels = [e.expand(B, -1, -1) for e in null.levels]
    return (generator.condition([e.float() for e in out.levels]),
            generator.condition([e.float() for e in null_levels]),
            predicted_embedding(out).float())


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="data folder in MindEye2 layout (a world or prepared NSD)")
    p.add_argument("--subject", type=int, default=1, help="NSD subject number (must be the encoder's)")
    p.add_argument("--encoder", required=True, help="train-encoder checkpoint (OUT/encoder)")
    p.add_argument("--tokenizer", required=True, help="train-tokenizer checkpoint (OUT/tokenizer)")
    p.add_argument("--generator", required=True, help="train-generator checkpoint (OUT/generator)")
    p.add_argument("--vision", default=None,
                   help="vision model that embeds candidates for best-of-N (default: the one the encoder was trained on)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--candidates", type=int, default=4, help="N of best-of-N (paper: 4); 1 = single-shot only")
    p.add_argument("--cfg", type=float, default=6.0, help="classifier-free guidance at the last scale (ramped from 0)")
    p.add_argument("--cfg-off-from", type=int, default=None,
                   help="0-based scale from which CFG is switched off (faster; Switti turns it off for the last scales)")
    p.add_argument("--top-k", type=int, default=400, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=0, help="run seed; each image's seed derives from it and the image index")
    p.add_argument("--batch", type=int, default=8, help="test images per forward pass (does not change the result)")
    p.add_argument("--limit", type=int, default=None, help="only the first N test images (ascending index)")
    p.add_argument("--coarse-to-fine", type=int, default=4, help="save per-scale pictures for this many images")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32"), help="auto: bf16 autocast where fast")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT/recons.safetensors")


def run(args: argparse.Namespace) -> int:
    with distributed_session(args.device) as d:
        _run(args, d)
    return 0


def _load_stack(args, device):
    from mindhier.encoder import load_encoder
    from mindhier.tokenizer import load_tokenizer

    generator, gen_meta = load_generator(args.generator, device)
    _, enc_meta = load_checkpoint(args.encoder, kind="encoder")
    _, tok_meta = load_checkpoint(args.tokenizer, kind="tokenizer")
    check_belongs(gen_meta, enc_meta, tok_meta,
                  {"encoder": args.encoder, "tokenizer": args.tokenizer, "generator": args.generator})
    if int(enc_meta.get("subject", args.subject)) != args.subject:
        raise MismatchError(f"{args.encoder} was trained on subject {enc_meta.get('subject')}, not --subject "
                            f"{args.subject}; encoders are subject-specific")
    from mindhier.data import TestSet

    test = TestSet(args.data, args.subject, policy="average")
    encoder, _ = load_encoder(args.encoder, num_voxels=test.num_voxels, subject=args.subject, device=device)
    tokenizer = load_tokenizer(args.tokenizer, device=device)
    return generator, encoder, tokenizer, test, gen_meta, enc_meta


def _vision_embedder(args, enc_meta, device):
    from mindhier.vision import load_vision

    path = args.vision or enc_meta.get("vision", {}).get("path")
    if not path:
        raise MindhierError("best-of-N needs the vision model to embed candidates and the encoder checkpoint "
                            "names none: pass --vision (the model the encoder was trained against) or --candidates 1")
    vision = load_vision(path, device=device).freeze()
    return lambda images01: vision.image_embedding(images01.to(device))


def _run(args, d) -> None:
    out = Path(args.out)
    if (out / "recons.safetensors").exists() and not args.force:
        raise MindhierError(f"{out / 'recons.safetensors'} exists; choose another --out or pass --force")
    device = d.device
    generator, encoder, tokenizer, test, gen_meta, enc_meta = _load_stack(args, device)
    if args.precision != "fp32" and bf16_is_fast(device):
        generator = generator.to(torch.bfloat16)   # cast once: autocast would re-cast every weight at every scale
    settings = SamplingSettings(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, cfg_off_from=args.cfg_off_from,
                                seed=args.seed, num_candidates=args.candidates)
    embed = _vision_embedder(args, enc_meta, device) if args.candidates > 1 else None
    n = len(test) if args.limit is None else min(args.limit, len(test))
    mine = list(range(d.rank, n, d.world_size))           # shard by rank; seeds are per image
    results = {}
    from tqdm.auto import tqdm

    batches = [mine[i:i + args.batch] for i in range(0, len(mine), args.batch)]
    for rows in tqdm(batches, desc="reconstruct", disable=not d.is_main, dynamic_ncols=True):
        voxels = torch.stack([test[i]["voxels"] for i in rows]).to(device)
        ids = [int(test.image_indices[i]) for i in rows]
        with autocast(device, enabled=args.precision != "fp32"):
            cond, null, predicted = encode_conditions(encoder, generator, voxels)
            rec = reconstruct(generator, tokenizer, cond, null, settings, ids, predicted=predicted,
                              embed_images=embed, return_cumulative=any(i < args.coarse_to_fine for i in rows))
        results.update(_per_image(rec, rows, ids))
    gathered = [results]
    if d.enabled:
        gathered = [None] * d.world_size
        torch.distributed.all_gather_object(gathered, results)
    if d.is_main:
        merged = {k: v for part in gathered for k, v in part.items()}
        _write_outputs(out, merged, n, settings, args, gen_meta)


def _per_image(rec: Reconstructions, rows, ids) -> dict:
    """Plain CPU tensors per test row: what every rank sends to rank 0."""
    out = {}
    for b, (row, image) in enumerate(zip(rows, ids)):
        item = {"image_index": image, **{label: rec.by_label(label)[b].float().cpu() for label in rec.labels}}
        if rec.cumulative:
            primary = rec.labels[-1]
            item["cumulative"] = torch.stack([step[b].float().cpu() for step in rec.cumulative[primary]])
        if rec.scores is not None:
            item["scores"] = rec.scores[b].cpu().tolist()
            item["chosen"] = int(rec.chosen[b])
        out[row] = item
    return out


def _write_outputs(out: Path, merged: dict, n: int, settings: SamplingSettings, args, gen_meta: dict) -> None:
    from safetensors.torch import save_file

    from mindhier.report import image_grid, to_uint8

    if sorted(merged) != list(range(n)):
        raise RuntimeError(f"reconstructed {len(merged)} of {n} test images")
    items = [merged[i] for i in range(n)]
    labels = [k for k in ("single-shot", f"best-of-{settings.num_candidates}") if k in items[0]]
    primary = labels[-1]
    index = torch.tensor([it["image_index"] for it in items])
    (out / "images").mkdir(parents=True, exist_ok=True)
    for label in labels:
        stack = torch.stack([it[label] for it in items]).contiguous()
        name = "recons.safetensors" if label == primary else f"recons_{label}.safetensors"
        save_file({"recons": stack, "image_index": index}, str(out / name), metadata={"label": label})
    from PIL import Image

    for it, tile in zip(items, to_uint8(torch.stack([it[primary] for it in items]).numpy())):
        Image.fromarray(tile).save(out / "images" / f"{it['image_index']:06d}.png")
    steps = [it for it in items if "cumulative" in it]
    if steps:
        (out / "coarse_to_fine").mkdir(exist_ok=True)
        for it in steps:
            image_grid([it["cumulative"].numpy()], cell=96).save(out / "coarse_to_fine" / f"{it['image_index']:06d}.png")
    record = {
        "checkpoints": {"encoder": str(args.encoder), "tokenizer": str(args.tokenizer), "generator": str(args.generator),
                        "generator_identity": checkpoint_identity(gen_meta)},
        "data": str(args.data), "subject": args.subject, "split": "test (shared1000 / world test images)",
        "averaging": "voxels averaged over repetitions before the encoder", "n_images": n,
        "sampling": dataclasses.asdict(settings), "labels": labels, "primary": primary,
        "seeds": "per image: SeedSequence([seed, image_index, candidate])", "routing": gen_meta["config"]["routing"],
        "best_of_n_ranking": "cosine(vision embedding of candidate, encoder's predicted embedding)" if len(labels) > 1 else None,
        "chosen": {str(it["image_index"]): it.get("chosen") for it in items} if len(labels) > 1 else None,
    }
    (out / "settings.json").write_text(json.dumps(record, indent=2))
    print(f"reconstruct: {n} images -> {out} ({', '.join(labels)}; primary {primary})", flush=True)
