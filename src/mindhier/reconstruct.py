"""``mindhier reconstruct``: test-set reconstructions from fMRI (paper §3.3, SPEC §5).

The frozen encoder turns each test image's voxels into the hierarchy e_1..e_M: by default the 3
repetitions' voxels are averaged first (MindHier's and MindEye1's policy, the paper's tables);
``--averaging outputs`` runs the encoder on each repetition and averages its outputs (MindEye2's).
Either way settings.json records the policy, and the tables made from it show it. The generator
samples the token pyramid scale by scale under scale-aware guidance (CFG against the encoder's
output for all-zero voxels); the tokenizer decodes it.

    mindhier reconstruct --data worlds/demo --subject 1 --encoder runs/encoder/encoder \\
        --tokenizer runs/tokenizer/tokenizer --generator runs/generator/generator --out runs/recons
    torchrun --standalone --nproc_per_node=2 -m mindhier reconstruct ...   (same images, faster)

Every image is seeded from (--seed, its image index, candidate), so the output does not depend
on --batch or on the number of processes. With --candidates N > 1 (paper: 4) each image gets N
candidates ranked by the cosine similarity of their vision embedding to the encoder's
*predicted* embedding (never the ground truth); both the single-shot (candidate 0) and the
best-of-N results are written and labelled. The command is a loop over
:class:`mindhier.pipeline.Pipeline`: the same seeds give the same images from Python.

OUT/recons.safetensors          key "recons": (N, 3, H, W) in [0, 1], ascending image index
                                (best-of-N when N > 1; MindEye2-compatible), plus "image_index"
OUT/recons_single-shot.safetensors   the single-shot set (when N > 1)
OUT/images/IMAGE.png            one PNG per test image (the primary set)
OUT/coarse_to_fine/IMAGE.png    the picture after every scale, for the first --coarse-to-fine images
OUT/settings.json               checkpoints, split, averaging ("voxels"/"outputs"), sampling settings, seeds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from mindhier.data import averaging
from mindhier.errors import MindhierError
# The frozen stack lives in mindhier.pipeline; these names stay importable from here for the
# training commands and the demo, which load a generator or check checkpoints the same way.
from mindhier.pipeline import (  # noqa: F401
    GENERATOR_KIND, TRAINING_PREFIXES, MismatchError, Pipeline, PipelineOutput, check_belongs, checkpoint_identity,
    encode_conditions, generator_config_for, load_generator,
)
from mindhier.runtime import distributed_session
from mindhier.sampling import SamplingSettings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="data folder in MindEye2 layout (a world or prepared NSD)")
    p.add_argument("--subject", type=int, default=1, help="NSD subject number (must be the encoder's)")
    p.add_argument("--encoder", required=True, help="train-encoder checkpoint (OUT/encoder)")
    p.add_argument("--tokenizer", required=True, help="train-tokenizer checkpoint (OUT/tokenizer)")
    p.add_argument("--generator", required=True, help="train-generator checkpoint (OUT/generator)")
    p.add_argument("--vision", default=None,
                   help="vision model that embeds candidates for best-of-N (default: the one the encoder was trained on)")
    p.add_argument("--out", required=True, help="output folder")
    averaging.add_argument(p, "reconstruction")
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
    p.add_argument("--lowlevel", default=None,
                   help="MindHier† (the paper's Table 1 rows marked †): blend every reconstruction with the blurry "
                        "image of this `mindhier train-lowlevel` checkpoint, after best-of-N ranking; the results "
                        "are labelled MindHier† in settings.json and every table made from them")
    p.add_argument("--blend-weight", type=float, default=None,
                   help="weight w of the low-level image: (1 - w) * reconstruction + w * low-level (default 0.45, "
                        "the official notebook's); needs --lowlevel")


def run(args: argparse.Namespace) -> int:
    with distributed_session(args.device) as d:
        _run(args, d)
    return 0


def _run(args, d) -> None:
    from tqdm.auto import tqdm

    from mindhier.data import TestSet

    out = Path(args.out)
    if (out / "recons.safetensors").exists() and not args.force:
        raise MindhierError(f"{out / 'recons.safetensors'} exists; choose another --out or pass --force")
    pipeline = Pipeline.from_checkpoints(args.encoder, args.tokenizer, args.generator, vision=args.vision,
                                         subject=args.subject, device=d.device, precision=args.precision)
    test = TestSet(args.data, args.subject, policy=averaging.dataset_policy(args.averaging))
    pipeline.check_voxel_count(test.num_voxels, f"{args.data} (subject {args.subject})")
    low = _load_lowlevel(args, test.num_voxels, pipeline, d.device)  # before sampling: fail early
    settings = SamplingSettings(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, cfg_off_from=args.cfg_off_from,
                                seed=args.seed, num_candidates=args.candidates)
    if args.candidates > 1:
        pipeline.image_embedder()                          # no vision model: fail before sampling
    n = len(test) if args.limit is None else min(args.limit, len(test))
    mine = list(range(d.rank, n, d.world_size))           # shard by rank; seeds are per image
    results = {}
    batches = [mine[i:i + args.batch] for i in range(0, len(mine), args.batch)]
    for rows in tqdm(batches, desc="reconstruct", disable=not d.is_main, dynamic_ncols=True):
        voxels = torch.stack([test[i]["voxels"] for i in rows])   # (B, V), or (B, 3, V) for --averaging outputs
        ids = [int(test.image_indices[i]) for i in rows]
        rec = pipeline(voxels, image_ids=ids, **dataclasses.asdict(settings), batch_size=len(rows),
                       return_scales=any(i < args.coarse_to_fine for i in rows))
        if low is not None:
            rec = _blended(rec, voxels, *low)
        results.update(_per_image(rec, rows, args.coarse_to_fine))
    gathered = [results]
    if d.enabled:
        gathered = [None] * d.world_size
        torch.distributed.all_gather_object(gathered, results)
    if d.is_main:
        merged = {k: v for part in gathered for k, v in part.items()}
        _write_outputs(out, merged, n, settings, args, pipeline.metadata["generator"], low[2] if low else None)


def _load_lowlevel(args, num_voxels: int, pipeline, device):
    """(decoder, weight, settings record) for --lowlevel, or None; refuses --blend-weight alone."""
    from mindhier.lowlevel import OFFICIAL_BLEND_WEIGHT, blend_record, check_blend_weight, load_lowlevel

    if args.lowlevel is None:
        if args.blend_weight is not None:
            raise MindhierError("--blend-weight needs --lowlevel CKPT (a `mindhier train-lowlevel` checkpoint)")
        return None
    weight = check_blend_weight(OFFICIAL_BLEND_WEIGHT if args.blend_weight is None else args.blend_weight)
    model, meta = load_lowlevel(args.lowlevel, num_voxels=num_voxels, subject=args.subject,
                                data_manifest=pipeline.metadata["encoder"].get("data_manifest"), device=device)
    return model, weight, blend_record(args.lowlevel, meta, weight)


def _blended(rec: PipelineOutput, voxels: torch.Tensor, model, weight: float, record: dict) -> PipelineOutput:
    """MindHier†: every set blended with the low-level image of the same voxels (ranking stays the
    generator's own; the coarse-to-fine strips show the generator's scales, unblended)."""
    from mindhier.lowlevel import blend, predict

    low = predict(model, voxels.to(next(model.parameters()).device)).cpu()
    return dataclasses.replace(rec, images=blend(rec.images, low, weight), single_shot=blend(rec.single_shot, low, weight))


def _per_image(rec: PipelineOutput, rows, coarse_to_fine: int) -> dict:
    """Plain CPU tensors per test row: what every rank sends to rank 0."""
    out = {}
    for b, (row, image) in enumerate(zip(rows, rec.image_ids)):
        item = {"image_index": image, "single-shot": rec.single_shot[b], rec.label: rec.images[b]}
        if rec.scales is not None and row < coarse_to_fine:
            item["cumulative"] = rec.scales[b]
        if rec.scores is not None:
            item["scores"] = rec.scores[b].tolist()
            item["chosen"] = int(rec.chosen[b])
        out[row] = item
    return out


def _write_outputs(out: Path, merged: dict, n: int, settings: SamplingSettings, args, gen_meta: dict,
                   lowlevel: dict | None = None) -> None:
    from safetensors.torch import save_file

    from mindhier.checkpoint import honour_umask
    from mindhier.lowlevel import method_name
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
        honour_umask(out / name)
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
        "method": method_name({"lowlevel": lowlevel}), "lowlevel": lowlevel,
        "averaging": args.averaging, "averaging_note": averaging.DESCRIPTIONS[args.averaging], "n_images": n,
        "sampling": dataclasses.asdict(settings), "labels": labels, "primary": primary,
        "seeds": "per image: SeedSequence([seed, image_index, candidate])", "routing": gen_meta["config"]["routing"],
        "best_of_n_ranking": "cosine(vision embedding of candidate, encoder's predicted embedding)" if len(labels) > 1 else None,
        "chosen": {str(it["image_index"]): it.get("chosen") for it in items} if len(labels) > 1 else None,
    }
    (out / "settings.json").write_text(json.dumps(record, indent=2))
    print(f"reconstruct: {n} images -> {out} ({', '.join(labels)}; primary {primary})", flush=True)
