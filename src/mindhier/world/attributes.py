"""Do reconstructions show what the stimulus showed? Attribute probes on the synthetic world.

PixCorr and two-way identification say *how much* a reconstruction resembles its stimulus; this
says *what* it got right, in the world's own terms. For every image the world knows its main
object's category and colour and its background's kind and colour (``image_params.json``).
Linear probes read these four attributes from an image; a reconstruction "shows" an attribute
when the probe reads the stimulus's true value from it.

The probes are ridge classifiers (one-hot targets, penalty chosen by exact leave-one-out
accuracy, :class:`mindhier.world.report.Ridge`) on three kinds of features, each standardised:
EfficientNet-Lite0's pooled ImageNet features at 112 px (they carry shape: a linear probe on
the small CLIP's embedding alone reads the main object's category at chance level), the
vision model's image embedding, and 4×4 block means of the pixels (colour and layout). They
are fitted on training stimuli and on the tokenizer's reconstructions of those stimuli, so
that they read the decoder's blurrier style as well as crisp images; the test images are
never used to fit them. (Leave-one-out then leaves out one of a stimulus/reconstruction pair
only, which tilts the penalty choice towards less shrinkage; it chooses among 11 penalties and
touches nothing else.) Reported beside every row: the probe's accuracy on the test
stimuli themselves (what a perfect reconstruction would score) and the majority-class rate
(what a constant guess scores).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mindhier.data import layout
from mindhier.errors import MindhierError
from mindhier.world.report import RELATIVE_ALPHAS, Ridge, accuracy

ATTRIBUTES = ("main_category", "main_colour", "background_kind", "background_colour")
BLOCKS = 4
LITE0_SIZE = 112   # 64-px world images upsampled; 224 px reads category only slightly better at 4× the cost


def read_params(world: str | Path) -> dict:
    path = layout.image_params_path(world)
    if not path.is_file():
        raise MindhierError(f"{path} not found: attribute probes need a synthetic world (`mindhier world`), "
                            "whose image_params.json names what each image shows; NSD has no such file")
    return json.loads(path.read_text())


def attribute_labels(world: str | Path, image_index: np.ndarray) -> dict[str, np.ndarray]:
    """Integer label of each attribute for the given images (from ``image_params.json``)."""
    params = read_params(world)
    images = [params["images"][int(i)] for i in image_index]
    colours, backgrounds = params["colours"], params["backgrounds"]
    return {
        "main_category": np.array([im["main_category"] for im in images]),
        "main_colour": np.array([colours.index(im["objects"][0]["colour"]) for im in images]),
        "background_kind": np.array([backgrounds.index(im["background"]["kind"]) for im in images]),
        "background_colour": np.array([colours.index(im["background"]["colour"]) for im in images]),
    }


def attribute_classes(world: str | Path) -> dict[str, int]:
    params = read_params(world)
    n_col = len(params["colours"])
    return {"main_category": len(params["categories"]), "main_colour": n_col,
            "background_kind": len(params["backgrounds"]), "background_colour": n_col}


@torch.no_grad()
def probe_features(images01: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor],
                   lite0: Callable[[torch.Tensor], torch.Tensor] | None = None, batch: int = 100) -> np.ndarray:
    """(n, 1280 + D + 48): Lite0 pooled features ‖ l2-normalised embedding ‖ 4×4 pixel blocks.

    ``embed`` and ``lite0`` take CPU images and move them where their model lives; ``lite0``
    maps Lite0-normalised images to pooled features (``metrics.nets.Lite0Pooled``), None
    leaves that part out."""
    from mindhier.metrics.nets import LITE0_MEAN, LITE0_STD

    mean, std = torch.tensor(LITE0_MEAN).view(1, 3, 1, 1), torch.tensor(LITE0_STD).view(1, 3, 1, 1)
    rows = []
    for chunk in images01.float().cpu().split(batch):
        e = embed(chunk).float().cpu()
        parts = [e / e.norm(dim=1, keepdim=True).clamp_min(1e-12),
                 torch.nn.functional.adaptive_avg_pool2d(chunk, BLOCKS).flatten(1)]
        if lite0 is not None:
            big = torch.nn.functional.interpolate(chunk, size=(LITE0_SIZE, LITE0_SIZE), mode="bicubic")
            parts.insert(0, lite0((big - mean) / std).float().cpu())
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows).numpy().astype(np.float64)


class AttributeProbes:
    """One ridge classifier per attribute, fitted on features of training images."""

    def __init__(self, features: np.ndarray, labels: dict[str, np.ndarray], classes: dict[str, int]):
        self.mean, self.std = features.mean(0), features.std(0) + 1e-8
        ridge = Ridge((features - self.mean) / self.std)
        self.predict = {}
        for name, y in labels.items():
            onehot = np.eye(classes[name])[y]
            loo = ridge.loo_predictions(onehot, RELATIVE_ALPHAS)
            best = max(loo, key=lambda a: accuracy(loo[a], onehot))
            self.predict[name] = ridge.predictor(onehot, best)

    def labels(self, features: np.ndarray) -> dict[str, np.ndarray]:
        x = (features - self.mean) / self.std
        return {name: f(x).argmax(axis=1) for name, f in self.predict.items()}


def shown_rates(probes: AttributeProbes, features: np.ndarray, truth: dict[str, np.ndarray]) -> dict[str, float]:
    """Fraction of images whose probed attribute equals the truth (see :func:`hit_rates`)."""
    return hit_rates(probes.labels(features), truth)


def majority_rates(train_labels: dict[str, np.ndarray], test_labels: dict[str, np.ndarray]) -> dict[str, float]:
    """What always answering the training set's most frequent value scores on the test images."""
    guess = {name: np.full_like(test_labels[name], np.bincount(train_labels[name]).argmax()) for name in ATTRIBUTES}
    return hit_rates(guess, test_labels)


def hit_rates(got: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, float]:
    """Per attribute, the fraction of images labelled right; ``colours_both``: the main object's
    and the background's colour both right."""
    hits = {name: got[name] == truth[name] for name in ATTRIBUTES}
    rates = {name: float(h.mean()) for name, h in hits.items()}
    rates["colours_both"] = float((hits["main_colour"] & hits["background_colour"]).mean())
    return rates
