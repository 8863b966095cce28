"""`mindhier eval-foundation`: what the foundation models can show on the fMRI world's test
stimuli, before any fMRI is involved, read by the world reader (issue 11's goals):

- **tokenizer**: its reconstruction of each stimulus (the best any generator over its tokens can
  do): the reader's rates on it beside the stimuli's own, their ratio, and PixCorr;
- **pretrained generator**: its single-shot drawing of each stimulus from that stimulus's own
  vision hierarchy v_{g_1..g_M} (the "oracle": the generator given perfect stage-1 features).

    mindhier eval-foundation --world worlds/demo --foundation checkpoints/foundation

Writes OUT.json, OUT.md and OUT.png (stimuli over tokenizer reconstructions over drawings, the
first 24 test images). Rates carry 95 % Wilson intervals; an attribute the reader reads from the
stimuli below 90 % is marked not readable, as in the demo report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from mindhier.world.reader import LABELS

TOKENIZER_ROW = "tokenizer reconstruction"
ORACLE_ROW = "pretrained generator on the stimulus's own vision features"


def world_test_stimuli(world: Path) -> tuple[np.ndarray, torch.Tensor, dict, dict]:
    """(test image ids, their pictures (N, 3, H, W) in [0, 1], their labels, the training images' labels)."""
    from mindhier.data import ImageStore
    from mindhier.world.corpus import held_out_image_indices as test_image_indices
    from mindhier.world.corpus import world_labels

    test = test_image_indices(world)
    store = ImageStore(world)
    train = np.setdiff1d(np.arange(store.num_images), test)
    images = torch.from_numpy(store.get(test)).float()
    store.close()
    labels = world_labels(world)
    return test, images, {k: v[test] for k, v in labels.items()}, {k: v[train] for k, v in labels.items()}


def evaluate_foundation(world: Path, folder: Path, cfg: float = 3.0, device: torch.device | None = None,
                        limit: int | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(result, pictures by row) for the foundation checkpoints in ``folder`` (reader, tokenizer,
    and, where present, vision + the pretrained generator)."""
    from mindhier.checkpoint import paths_for
    from mindhier.demo_report import tokenizer_ceiling
    from mindhier.evaluate import evaluate_reconstructions
    from mindhier.generator.pretrained import draw_from_own_features
    from mindhier.metrics import pixel_metrics
    from mindhier.reconstruct import load_generator
    from mindhier.sampling import SamplingSettings
    from mindhier.tokenizer import load_tokenizer
    from mindhier.vision import load_vision
    from mindhier.world import reader as R

    device = device or torch.device("cpu")
    ids, stimuli, truth, train_truth = world_test_stimuli(world)
    if limit:
        ids, stimuli, truth = ids[:limit], stimuli[:limit], {k: v[:limit] for k, v in truth.items()}
    reader, _ = R.load_reader(folder / "reader", device)
    tokenizer = load_tokenizer(folder / "tokenizer", device=device)
    rows = {TOKENIZER_ROW: tokenizer_ceiling(tokenizer, stimuli.to(device)).cpu()}
    if paths_for(folder / "generator")[1].is_file():
        generator, meta = load_generator(folder / "generator", device)
        vision = load_vision(folder / "vision", device=device).freeze()
        settings = SamplingSettings(cfg=cfg, num_candidates=1, seed=0)
        rows[ORACLE_ROW] = draw_from_own_features(generator, tokenizer, vision, meta["pretrain"]["vision"]["layers"],
                                                  stimuli.to(device), ids, settings)
    table = dict(R.attribute_table(reader, stimuli.to(device), truth, train_truth,
                                   {k: v.to(device) for k, v in rows.items()}))
    pixcorr = {name: evaluate_reconstructions(images, stimuli, metrics=pixel_metrics())["values"]["pixcorr"]
               for name, images in rows.items()}
    stimulus_rates = table["Stimuli themselves (reader ceiling)"]
    share = {k: r["rate"] / max(stimulus_rates[k]["rate"], 1e-12) for k, r in table[TOKENIZER_ROW].items()}
    result = {"world": str(world), "foundation": str(folder), "images": int(len(ids)), "cfg": cfg,
              "rates": table, "pixcorr": pixcorr, "tokenizer_share_of_stimulus_rate": share}
    return result, {"stimuli": stimuli, **rows}


def markdown(result: dict) -> str:
    keys = list(LABELS)
    lines = ["| row | " + " | ".join(LABELS[k] for k in keys) + " | PixCorr |", "|---" * (len(keys) + 2) + "|"]
    for name, rates in result["rates"].items():
        cells = [f"{r['rate']:.1%} [{r['low']:.0%}–{r['high']:.0%}]" + ("" if r["valid"] else " (not readable)")
                 for r in (rates[k] for k in keys)]
        pix = result["pixcorr"].get(name)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'' if pix is None else f'{pix:.3f}'} |")
    share = result["tokenizer_share_of_stimulus_rate"]
    lines += ["", "Tokenizer reconstruction as a share of the stimulus rate: "
              + ", ".join(f"{LABELS[k]} {share[k]:.0%}" for k in keys)]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world", default="worlds/demo", help="the synthetic fMRI world whose test stimuli are used")
    p.add_argument("--foundation", default="checkpoints/foundation",
                   help="folder with reader, tokenizer (and vision + generator) checkpoints")
    p.add_argument("--out", default=None, help="write OUT.json, OUT.md, OUT.png (default: FOUNDATION/world_eval)")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance of the drawings (the demo's)")
    p.add_argument("--limit", type=int, default=None, help="only the first N test images")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")


def run(args: argparse.Namespace) -> int:
    from mindhier.report import image_grid
    from mindhier.runtime import resolve_device

    folder = Path(args.foundation)
    result, pictures = evaluate_foundation(Path(args.world), folder, args.cfg, resolve_device(args.device), args.limit)
    text = markdown(result)
    print(text, end="")
    out = Path(args.out) if args.out else folder / "world_eval"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".json").write_text(json.dumps(result, indent=1))
    out.with_name(out.name + ".md").write_text(f"`mindhier eval-foundation --world {args.world} --foundation {folder} "
                                      f"--cfg {args.cfg}` on {result['images']} test stimuli\n\n{text}")
    n = min(24, result["images"])
    image_grid([p[:n].float().numpy() for p in pictures.values()], cell=64).save(out.with_name(out.name + ".png"))
    return 0
