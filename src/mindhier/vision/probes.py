"""What each layer of a vision model carries, read by linear probes on a synthetic world.

MindHier aligns encoder block m to vision layer g_m because the layers form a hierarchy (paper
§3.1–3.2, Table 3): shallow layers keep *where* and low-level colour, deep layers *what*. On the
synthetic world this can be measured instead of assumed: for every target layer (and the final
image embedding), ridge classifiers are fitted on the world's training stimuli and read, from
the held-out test stimuli, the main object's category, its colour and its 3×3 cell. A layer's
features are its CLS token and its patch tokens (the grid average-pooled to at most 8×8, so
position stays readable), projected to the shared space as the encoder's targets are
(v_g = proj(ln_post(h_g)), SPEC §2); the final embedding is the pooled CLIP embedding.

    mindhier probe-vision --vision checkpoints/foundation/vision --world worlds/demo

The probes are :class:`mindhier.world.attributes.AttributeProbes` (penalty by exact
leave-one-out accuracy on the training stimuli only); rates come with 95 % Wilson intervals.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mindhier.vision.base import LAYER_MAPS

PROBED = ("main_category", "main_colour", "main_cell")
MAX_GRID = 8  # patch grids larger than this are average-pooled down to it (ViT-L/14: 16×16 → 8×8)


def token_features(tokens: torch.Tensor) -> torch.Tensor:
    """(B, 1 + g², D) → (B, (1 + min(g, 8)²)·D): CLS ‖ the (pooled) patch grid, flattened."""
    b, t, d = tokens.shape
    side = math.isqrt(t - 1)
    if side * side != t - 1:
        raise ValueError(f"expected CLS + a square patch grid, got {t} tokens")
    grid = tokens[:, 1:].transpose(1, 2).reshape(b, d, side, side).float()
    if side > MAX_GRID:
        grid = F.adaptive_avg_pool2d(grid, MAX_GRID)
    return torch.cat([tokens[:, 0].float(), grid.flatten(1)], dim=1)


@torch.no_grad()
def layer_features(vision, images01: torch.Tensor, layers, batch: int = 100) -> dict[str, np.ndarray]:
    """Per probed layer ``"layer G"`` and ``"embedding"``: (N, F) float64 features."""
    device = next(vision.parameters()).device
    parts: dict[str, list] = {f"layer {g}": [] for g in layers}
    parts["embedding"] = []
    for chunk in images01.split(batch):
        chunk = chunk.float().to(device)
        for g, v in zip(layers, vision.image_layer_features(chunk, list(layers))):
            parts[f"layer {g}"].append(token_features(v).cpu())
        parts["embedding"].append(vision.image_embedding(chunk).float().cpu())
    return {k: torch.cat(v).numpy().astype(np.float64) for k, v in parts.items()}


def probe_layers(vision, world, layers) -> dict:
    """{feature set: {attribute: rate with interval}} on the world's test stimuli, plus the
    majority-class guess, for the layers ``layers`` and the final embedding."""
    from mindhier.data import ImageStore
    from mindhier.world.corpus import held_out_image_indices as test_image_indices
    from mindhier.world.attributes import AttributeProbes
    from mindhier.world.corpus import world_labels
    from mindhier.world.reader import ATTRIBUTES, rate_with_interval

    test = test_image_indices(Path(world))
    store = ImageStore(world)
    train = np.setdiff1d(np.arange(store.num_images), test)
    labels = world_labels(world)
    classes = {k: ATTRIBUTES[k] for k in PROBED}
    features = {}
    for split, ids in (("train", train), ("test", test)):
        images = torch.from_numpy(store.get(ids)).float()
        features[split] = layer_features(vision, images, layers)
    store.close()
    table = {}
    for name in features["train"]:
        probes = AttributeProbes(features["train"][name], {k: labels[k][train] for k in PROBED}, classes)
        read = probes.labels(features["test"][name])
        table[name] = {k: rate_with_interval(read[k] == labels[k][test]) for k in PROBED}
    table["majority guess"] = {k: rate_with_interval(labels[k][test] == np.bincount(labels[k][train]).argmax())
                               for k in PROBED}
    return {"world": str(world), "train_images": int(len(train)), "test_images": int(len(test)),
            "layers": [int(g) for g in layers], "rates": table}


def markdown(result: dict) -> str:
    head = "| features | " + " | ".join(PROBED) + " |"
    lines = [head, "|---" * (len(PROBED) + 1) + "|"]
    for name, rates in result["rates"].items():
        cells = [f"{r['rate']:.1%} [{r['low']:.0%}–{r['high']:.0%}]" for r in (rates[k] for k in PROBED)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vision", required=True, help="small-CLIP checkpoint (e.g. checkpoints/foundation/vision)")
    p.add_argument("--world", required=True, help="synthetic world whose stimuli are probed (e.g. worlds/demo)")
    p.add_argument("--layer-map", default="balanced", choices=sorted(LAYER_MAPS),
                   help="target layers to probe (those stage 1 aligns to)")
    p.add_argument("--all-layers", action="store_true", help="probe every layer 1..depth instead")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md (default: print only)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")


def run(args: argparse.Namespace) -> int:
    from mindhier.runtime import resolve_device
    from mindhier.vision import load_vision, scaled_layer_map

    vision = load_vision(args.vision, device=resolve_device(args.device)).freeze()
    layers = (tuple(range(1, vision.num_layers + 1)) if args.all_layers
              else scaled_layer_map(args.layer_map, vision.num_layers))
    result = {"vision": str(args.vision), "layer_map": "all" if args.all_layers else args.layer_map,
              **probe_layers(vision, args.world, layers)}
    text = markdown(result)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_name(out.name + ".json").write_text(json.dumps(result, indent=1))
        out.with_name(out.name + ".md").write_text(f"Linear probes on `{args.vision}`, world `{args.world}` "
                                          f"({result['train_images']} training / {result['test_images']} test "
                                          f"stimuli)\n\n{text}")
    return 0
