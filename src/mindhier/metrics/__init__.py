"""MindEye2's evaluation (SPEC §6): pixel metrics, feature networks, two-way identification.

- :mod:`~mindhier.metrics.core`  — resizes, PixCorr and SSIM (each the whole procedure, 256 px
  pre-resize included), two-way identification, correlation distance
- :mod:`~mindhier.metrics.nets`  — feature networks built from definitions + user weight files,
  sha256-checked against torchvision's published files
- :mod:`~mindhier.metrics.suite` — the metric columns and the standard / offline suites
- :mod:`~mindhier.metrics.tv`    — importing torchvision on a CPU torch (SPEC §8)

``mindhier.evaluate.evaluate_reconstructions`` runs a suite on (recons, ground truth).
"""

from mindhier.metrics.core import (
    correlation_distance,
    pixcorr,
    resize,
    ssim,
    to_eval_size,
    two_way_identification,
)
from mindhier.metrics.suite import (
    LITERATURE,
    FeatureMetric,
    Metric,
    PixelMetric,
    default_metrics,
    lite0_metrics,
    offline_metrics,
    pixel_metrics,
    standard_metrics,
    vision_metric,
)

__all__ = [
    "LITERATURE", "FeatureMetric", "Metric", "PixelMetric", "correlation_distance", "default_metrics",
    "lite0_metrics", "offline_metrics", "pixcorr", "pixel_metrics", "resize", "ssim", "standard_metrics",
    "to_eval_size", "two_way_identification", "vision_metric",
]
