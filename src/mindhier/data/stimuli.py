"""Which stimuli stage 2 trains on, and a refusal to train a large generator on small ones.

The paper's generator learns at 512 px from NSD's own 425-px stimuli (appendix E; the official
code: ``Resize(576, LANCZOS) → RandomCrop(512)`` on ``nsd_stimuli.hdf5``). MindEye2's
``coco_images_224_float16.hdf5`` is what stage 1 needs (the vision model works at 224), but a
512-px generator fed those images upsampled 224 → 512 spends its finest scales on learning
upsampling blur. So stage 2 opens the *largest* source a data folder holds (or the one
``--stimuli`` names) and refuses to upsample more than NSD's own stimuli would at the paper's
512 px, unless ``--allow-upsampled-stimuli`` says so; the choice is recorded in the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mindhier.data import layout
from mindhier.data.readers import DataError, ImageStore, image_sources

NSD_STIMULUS_SIZE, PAPER_IMAGE_SIZE = 425, 512
# The most upsampling the paper itself does: 425-px stimuli for a 512-px generator (×1.2).
MAX_UPSAMPLING = PAPER_IMAGE_SIZE / NSD_STIMULUS_SIZE


class StimuliResolutionError(DataError):
    """The available stimuli are too small for the generator: it would learn upsampling blur."""


def add_arguments(p) -> None:
    p.add_argument("--stimuli", default=None,
                   help="stimulus source for stage 2: NSD's nsd_stimuli.hdf5 (imgBrick, 425 px), a coco_images "
                        "HDF5 file or a folder of image_XXXXXX.png (default: the largest one in --data)")
    p.add_argument("--allow-upsampled-stimuli", action="store_true",
                   help="train even when the stimuli are smaller than the generator needs (they are upsampled "
                        "and the finest scales learn blur); recorded in the checkpoint")


def open_largest(root: str | Path, override: str | Path | None = None) -> ImageStore:
    """The stimulus source with the largest images in ``root`` (ties: ImageStore's preference,
    the 224-px file first), or the one ``override`` names."""
    if override is not None:
        return ImageStore(root, source=override)
    found = image_sources(root)
    if not found:
        return ImageStore(root)  # raises the reader's "image file not found" with the fix
    stores = [ImageStore(root, source=s) for s in found]
    best = max(stores, key=lambda s: min(s.image_size))  # max() keeps the first of equals
    for store in stores:
        if store is not best:
            store.close()
    return best


def upsampling(store: ImageStore, size: int) -> float:
    """How much the shorter side of ``store``'s images is stretched to reach ``size`` px."""
    return size / min(store.image_size)


def check_resolution(store: ImageStore, size: int, allow_upsampled: bool) -> dict:
    """Refuse stimuli that a ``size``-px generator would see upsampled more than the paper's
    own 425 → 512; with ``allow_upsampled``, go on. Returns the record for the checkpoint."""
    factor = upsampling(store, size)
    record = {"kind": store.kind, "path": str(store.path), "image_size": list(store.image_size),
              "num_images": store.num_images, "generator_size": int(size), "upsampling": round(factor, 4),
              "allow_upsampled_stimuli": bool(allow_upsampled)}
    if factor > MAX_UPSAMPLING + 1e-9 and not allow_upsampled:
        raise StimuliResolutionError(_too_small(store, size, factor))
    return record


def _too_small(store: ImageStore, size: int, factor: float) -> str:
    h, w = store.image_size
    others = [f"{p} ({k})" for k, p in image_sources(store.root) if p != store.path]
    looked = f"; also found: {', '.join(others)}" if others else ""
    return (f"{store.path}: the largest stimuli available are {h}×{w} px ({store.kind}, {store.num_images} images"
            f"{looked}), but the tokenizer/generator works at {size}×{size}: every training image would be "
            f"upsampled ×{factor:.2f}, and the generator's finest scales would learn upsampling blur instead of "
            f"detail (the paper trains on 512-px crops of NSD's 425-px stimuli, ×{MAX_UPSAMPLING:.2f} at most). "
            f"Fix: put NSD's nsd_stimuli.hdf5 (dataset imgBrick, (73000, 425, 425, 3) uint8) into "
            f"{store.root} as {layout.stimuli_hdf5_path(store.root).name} (`mindhier prepare-nsd` links it), or "
            "pass --stimuli PATH (that file, or a folder of full-size image_XXXXXX.png); or use a smaller "
            "tokenizer; or pass --allow-upsampled-stimuli to train on them anyway (recorded in the checkpoint).")


def describe(record: dict) -> str:
    """One line for the run's banner: which stimuli, and whether they are upsampled."""
    h, w = record["image_size"]
    note = f", UPSAMPLED x{record['upsampling']:.2f} (--allow-upsampled-stimuli)" if record["upsampling"] > MAX_UPSAMPLING else ""
    return f"stimuli {h}x{w} from {Path(record['path']).name}{note}"


def check_covers(store: ImageStore, image_indices: np.ndarray) -> None:
    """Every image the run needs is in the store (a --stimuli file of another dataset is not)."""
    top = int(np.max(image_indices, initial=-1))
    if top >= store.num_images:
        raise DataError(f"{store.path}: holds {store.num_images} images, but the trials use image index {top}; "
                        "these stimuli do not belong to --data — pass the stimulus file of the same dataset.")


def diff_stimuli(saved: dict | None, now: dict) -> list[str]:
    """How the stimuli of a resumed run differ from those it was trained on (checkpoints from
    before the record existed are not compared)."""
    if not saved:
        return []
    keys = ("kind", "image_size", "num_images")
    return [f"stimuli.{k}: expected {now[k]!r}, checkpoint has {saved.get(k)!r} ({saved.get('path')})"
            for k in keys if saved.get(k) != now[k]]
