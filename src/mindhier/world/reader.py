"""The world reader: a small CNN that reads a synthetic-world picture's scene parameters (SPEC §1.4).

It is the instrument behind "what the reconstructions show": trained on the pretraining corpus
with the scene parameters as labels, it reads from any 64-px picture (stimulus, tokenizer
reconstruction, generator output)

- the main object's category, colour and 3×3 position cell,
- the background's kind and colour,
- which categories are present (a 0/1 vector; "right" means the whole set is right).

A rate it reports is only a result where the reader itself reads that attribute from the **test
stimuli** at ≥ ``VALID_RATE`` (90 %); :func:`validity` says which attributes pass, and the report
marks the others instead of reporting them.

Checkpoints are ``mindhier.checkpoint`` pairs of kind ``"reader"`` (``train-reader`` writes
OUT/reader.{safetensors,json}).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mindhier.checkpoint import load_checkpoint, load_state_strict, model_tensors
from mindhier.config import from_dict
from mindhier.world.images import BACKGROUNDS, CATEGORIES, COLOUR_NAMES

KIND = "reader"
VALID_RATE = 0.90  # an attribute is reported only where the reader reads it from test stimuli this well

# attribute -> number of classes; "present" is multi-label over the categories.
ATTRIBUTES: dict[str, int] = {
    "main_category": len(CATEGORIES),
    "main_colour": len(COLOUR_NAMES),
    "main_cell": 9,
    "background_kind": len(BACKGROUNDS),
    "background_colour": len(COLOUR_NAMES),
    "present": len(CATEGORIES),
}
LABELS = {  # how the report names them
    "main_category": "main object: shape", "main_colour": "main object: colour",
    "main_cell": "main object: position (3×3)", "background_kind": "background: kind",
    "background_colour": "background: colour", "present": "categories present (all)",
}


@dataclass(frozen=True)
class ReaderConfig:
    image_size: int = 64
    widths: tuple = (32, 64, 128)  # per resolution level; each halves the side (64 px -> 32, 16, 8)
    hidden: int = 256
    dropout: float = 0.1


PRESETS = {"tiny": ReaderConfig(image_size=32, widths=(8, 16), hidden=64),
           "demo": ReaderConfig()}


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.GELU())


class WorldReader(nn.Module):
    """Conv pyramid → flattened last map (keeps *where*, which pooling would lose) → heads."""

    def __init__(self, cfg: ReaderConfig):
        super().__init__()
        self.cfg = cfg
        layers, cin = [], 3
        for width in cfg.widths:
            layers += [_conv(cin, width, stride=2), _conv(width, width)]
            cin = width
        self.body = nn.Sequential(*layers, nn.Conv2d(cin, 32, 1))
        side = cfg.image_size // 2 ** len(cfg.widths)
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(32 * side * side, cfg.hidden), nn.GELU(),
                                  nn.Dropout(cfg.dropout))
        self.heads = nn.ModuleDict({name: nn.Linear(cfg.hidden, n) for name, n in ATTRIBUTES.items()})

    def forward(self, images01: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) in [0, 1] (resized to the reader's size) → logits per attribute."""
        x = images01.float()
        if x.shape[-1] != self.cfg.image_size:
            x = F.interpolate(x, size=(self.cfg.image_size,) * 2, mode="bilinear", antialias=True)
        h = self.neck(self.body(2 * x - 1))
        return {name: head(h) for name, head in self.heads.items()}


def loss_fn(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over attributes of cross-entropy (binary cross-entropy for "present")."""
    terms = [F.binary_cross_entropy_with_logits(v, labels[k].float()) * ATTRIBUTES[k] if k == "present"
             else F.cross_entropy(v, labels[k]) for k, v in logits.items()]
    return torch.stack(terms).mean()


def predictions(logits: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Class per attribute; (B, 12) 0/1 for "present"."""
    return {k: ((v > 0).to(torch.uint8) if k == "present" else v.argmax(-1)).cpu().numpy()
            for k, v in logits.items()}


@torch.no_grad()
def read(reader: WorldReader, images01: torch.Tensor, batch: int = 256) -> dict[str, np.ndarray]:
    """What the reader sees in each image: ``predictions`` for (N, 3, H, W) in [0, 1]."""
    reader.eval()
    device = next(reader.parameters()).device
    parts = [predictions(reader(chunk.to(device))) for chunk in images01.split(batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in ATTRIBUTES}


def hits(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per image, 1 where the read attribute equals the true one ("present": the whole set)."""
    return {k: (pred[k] == truth[k]).all(axis=1) if k == "present" else pred[k] == truth[k]
            for k in ATTRIBUTES}


def rate_with_interval(hit: np.ndarray, z: float = 1.96) -> dict:
    """Share of hits with its 95 % Wilson score interval (well-behaved near 0 and 1)."""
    n, k = int(len(hit)), int(np.sum(hit))
    if n == 0:
        return {"rate": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"rate": p, "low": max(0.0, centre - half), "high": min(1.0, centre + half), "n": n}


def rates(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, dict]:
    return {k: rate_with_interval(v) for k, v in hits(pred, truth).items()}


def majority_rates(train_truth: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, dict]:
    """The floor of floors: always answer the training set's most frequent value."""
    pred = {}
    for k, v in train_truth.items():
        n = len(truth[k])
        if k == "present":
            pred[k] = np.repeat((v.mean(0) > 0.5).astype(v.dtype)[None], n, axis=0)
        else:
            pred[k] = np.full(n, np.bincount(v).argmax())
    return rates(pred, truth)


def validity(stimulus_rates: dict[str, dict]) -> dict[str, bool]:
    """Which attributes the reader reads from the test stimuli well enough to report."""
    return {k: r["rate"] >= VALID_RATE for k, r in stimulus_rates.items()}


def load_reader(path, device="cpu") -> tuple[WorldReader, dict]:
    tensors, meta = load_checkpoint(path, kind=KIND)
    model = WorldReader(from_dict(ReaderConfig, meta["config"]))
    load_state_strict(model, model_tensors(tensors), path)
    return model.to(device).eval(), meta


def attribute_table(reader: WorldReader, stimuli01: torch.Tensor, truth: dict[str, np.ndarray],
                    train_truth: dict[str, np.ndarray], rows: dict[str, torch.Tensor]) -> list[tuple[str, dict]]:
    """The report's "what the reconstructions show" table: per row, each attribute's rate with
    its 95 % interval, read by ``reader``. The first row is the stimuli themselves (the reader's
    ceiling); an attribute the reader reads from them below ``VALID_RATE`` is marked
    ``valid: False`` in every row (shown as not readable, never as a result); the last row is
    the majority guess."""
    stim = rates(read(reader, stimuli01), truth)
    valid = validity(stim)
    table = [("Stimuli themselves (reader ceiling)", stim)]
    table += [(name, rates(read(reader, images.float()), truth)) for name, images in rows.items()]
    table.append(("Majority class (constant guess)", majority_rates(train_truth, truth)))
    return [(name, {k: {**r, "valid": valid[k], "ceiling": stim[k]["rate"]} for k, r in row.items()})
            for name, row in table]
