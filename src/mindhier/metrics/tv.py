"""Import torchvision on any torch build (SPEC §8).

The pinned torchvision wheel is a CUDA build. On a CPU-only torch its C++ extension (``_C.so``)
cannot load, and ``import torchvision`` then dies registering fake kernels for
``torchvision::nms`` / ``qnms``, operators nobody defined. Declaring the two schemas first lets
the import succeed; model definitions and tensor transforms work, the C++ ops (nms, roi_align,
image decoding) do not, and mindhier uses none of them. Where the real extension loads (a CUDA
torch, or a matching CPU torchvision), it is used and no schema is declared.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys
from types import ModuleType

import torch

# Kept alive for the life of the process: a ``torch.library.Library`` unregisters its
# definitions when garbage-collected.
_SHIM_LIBRARY: torch.library.Library | None = None

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _load_real_extension() -> bool:
    """Load torchvision's own ``_C`` without importing the package (which would fail)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for folder in spec.submodule_search_locations:
        for lib in glob.glob(os.path.join(folder, "_C*.so")) + glob.glob(os.path.join(folder, "_C*.pyd")):
            try:
                torch.ops.load_library(lib)
                return True
            except (OSError, RuntimeError):
                continue
    return False


def _declare_schemas() -> None:
    global _SHIM_LIBRARY
    _SHIM_LIBRARY = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _SHIM_LIBRARY.define(schema)


def import_torchvision() -> ModuleType:
    """``import torchvision``, declaring the missing op schemas first when its C++ ops can't load.

    Raises ``ImportError`` (with the fix) when torchvision is not installed at all.
    """
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    if importlib.util.find_spec("torchvision") is None:
        raise ImportError("torchvision is not installed: pip install torchvision==0.28.0 (pinned with torch, SPEC §8)")
    if not _has_op("nms") and not _load_real_extension():
        _declare_schemas()
    return importlib.import_module("torchvision")


def torchvision_models() -> ModuleType:
    """``torchvision.models`` through :func:`import_torchvision`."""
    import_torchvision()
    return importlib.import_module("torchvision.models")
