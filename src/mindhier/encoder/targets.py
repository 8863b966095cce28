"""Which vision layers the encoder levels align with (g_m, paper §3.2 and Table 3), and checks
that the target tensors the loss needs are there.

The paper's maps are for CLIP ViT-L/14's 24 layers: "balanced" g_m = 8 + 4m → {12, 16, 20, 24}
(MindHier's choice), "early" g_m = 6m → {6, 12, 18, 24}, "late" g_m = 16 + 2m → {18, 20, 22, 24}.
For a backbone of another depth the vision package scales them (``scaled_layer_map``: each
layer keeps its relative depth). "default" is the backbone's own ``default_layers``. Also the
caption rule of the text target (see CAPTION_MODES) and its on-disk cache of caption variants.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

import h5py
import numpy as np

from mindhier.data import caption_for, load_captions
from mindhier.errors import MindhierError
from mindhier.vision import LAYER_MAPS, scaled_layer_map

LAYER_MAP_CHOICES = ("default", *LAYER_MAPS)


class MissingTargetsError(MindhierError, KeyError):
    """A target cache that lacks a layer (or the text tokens) the loss needs."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def layer_map(name: str, depth: int, default: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """g_1..g_M for map ``name`` on a vision model of ``depth`` layers (hidden_states[g]).
    "default" means ``default`` (the backbone's default_layers) or else the balanced map."""
    if name == "default":
        return tuple(int(g) for g in default) if default is not None else scaled_layer_map("balanced", depth)
    if name not in LAYER_MAPS:
        raise MindhierError(f"unknown layer map {name!r}; choose one of {list(LAYER_MAP_CHOICES)}")
    return scaled_layer_map(name, depth)


def required_keys(layers: tuple[int, ...], final_layer: int) -> list[str]:
    keys = sorted({f"layer_{g}" for g in (*layers, final_layer)}, key=lambda k: int(k.split("_")[1]))
    return keys + ["text"]


def check_cached_layers(cached: tuple[int, ...], layers: tuple[int, ...], final_layer: int, where: str) -> None:
    """Fail before training when the cache lacks a layer the loss needs."""
    missing = sorted((set(layers) | {final_layer}) - set(cached))
    if missing:
        raise MissingTargetsError(
            f"{where} holds vision targets for layers {sorted(cached)}, but this encoder aligns with "
            f"layers {list(layers)} and the final layer {final_layer}; missing {missing}. Rebuild the "
            f"target cache with those layers, or pick a layer map they cover."
        )


def check_batch_targets(targets: dict, layers: tuple[int, ...], final_layer: int, where: str) -> None:
    missing = [k for k in required_keys(layers, final_layer) if k not in targets]
    if missing:
        raise MissingTargetsError(
            f"{where} returned targets {sorted(targets)} without {missing}; the cache was built for "
            f"other layers: rebuild it for layers {list(layers)} + final {final_layer}"
        )


# ---- caption rotation (the text target of stage 1) ---------------------------------------------
#
# The official stage-1 loop (github.com/XuZhang2/MindHier, brainencoder/train.py) encodes, for
# batch ``train_i`` of an epoch, caption ``prompts[train_i % 3]`` of every image in the batch
# (``repeat_index = train_i % 3``): over the epochs each image meets its first three captions in
# turn. One batch there is one optimiser step; here one step is the global batch, so "rotate"
# uses caption (step within the epoch) % 3 for every sample of the step, on every rank and micro
# batch: a function of the step alone, so a resumed run replays it. "fixed" is this toolkit's
# earlier rule: always caption (image index) % 3, the one in the vision target cache
# (mindhier.vision.targets).
CAPTION_MODES = ("rotate", "fixed")
CAPTION_VARIANTS = 3
TEXT_VARIANTS_FORMAT = 1


def caption_variant(step_in_epoch: int) -> int:
    """Which caption of each image the step's text target encodes under "rotate"."""
    return step_in_epoch % CAPTION_VARIANTS


def text_variant_name(variant: int) -> str:
    return f"text_{variant}"


def text_variants_key(vision, image_indices: np.ndarray) -> dict:
    images = hashlib.sha256(np.ascontiguousarray(image_indices, dtype=np.int64).tobytes()).hexdigest()[:12]
    return {"format": TEXT_VARIANTS_FORMAT, "model": vision.identity(), "variants": CAPTION_VARIANTS,
            "text": "caption v of image i, v = 0..2", "images": images}


def text_variants_path(vision, image_indices: np.ndarray, cache_dir) -> Path:
    key = text_variants_key(vision, image_indices)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"text_variants_{vision.identity()['name']}_n{len(image_indices)}_{digest}.h5"


def cached_text_variants(vision, data_root, image_indices, cache_dir, batch_size: int = 64):
    """A target cache (mindhier.vision.targets.TargetCache) whose datasets ``text_0..text_2``
    hold the text tokens of captions 0..2 of ``image_indices``; built when absent."""
    from mindhier.vision.targets import TargetCache  # here: it needs tqdm, which the encoder package must not

    images = np.unique(np.asarray(image_indices, dtype=np.int64))
    path = text_variants_path(vision, images, cache_dir)
    key = text_variants_key(vision, images)
    if not path.is_file():
        build_text_variants(vision, load_captions(data_root), images, key, path, batch_size)
    return TargetCache(path, expect_key=key)


def build_text_variants(vision, captions: np.ndarray, images: np.ndarray, key: dict, path: Path,
                        batch_size: int = 64) -> None:
    """Write the file :func:`cached_text_variants` reads (in TargetCache's layout), through a
    temporary name renamed at the end, so an interrupted build leaves nothing that looks whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    shape = (len(images), vision.text_tokens, vision.text_dim)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["key"] = json.dumps(key, sort_keys=True)
            f.attrs["layers"] = np.zeros(0, dtype=np.int64)
            f.create_dataset("image_indices", data=images)
            for v in range(CAPTION_VARIANTS):
                f.create_dataset(text_variant_name(v), shape, dtype="f2", chunks=(1, *shape[1:]))
            for start in range(0, len(images), batch_size):
                rows = slice(start, min(len(images), start + batch_size))
                for v in range(CAPTION_VARIANTS):
                    texts = [caption_for(captions, int(i), v) for i in images[rows]]
                    tokens, _ = vision.text_targets(texts)
                    f[text_variant_name(v)][rows] = tokens.cpu().numpy().astype(np.float16)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
