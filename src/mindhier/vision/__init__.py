"""Frozen vision–language feature hierarchies: the targets of stage 1 (paper §3.2, SPEC §2).

``load_vision(path)`` opens either backbone behind one interface (:class:`VisionHierarchy`):

- a ``mindhier train-vision`` checkpoint (``X.safetensors`` + ``X.json``, kind "vision"): the
  in-project small CLIP trained on the synthetic world (the offline default);
- a folder in the Hugging Face layout (config.json, model.safetensors, tokenizer files): a real
  CLIP such as ``openai/clip-vit-large-patch14``, read with ``local_files_only``.

Targets for training are cached on disk per image set (:mod:`mindhier.vision.targets`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mindhier.checkpoint import paths_for
from mindhier.vision.base import LAYER_MAPS, VisionError, VisionHierarchy, scaled_layer_map
from mindhier.vision.small_clip import CHECKPOINT_NAME, SmallClip, is_small_clip_checkpoint, load_small_clip

__all__ = ["LAYER_MAPS", "SmallClip", "VisionError", "VisionHierarchy", "load_vision", "scaled_layer_map"]


def load_vision(path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> VisionHierarchy:
    """The frozen vision hierarchy stored at ``path`` (small-CLIP checkpoint or HF CLIP folder)."""
    p = Path(path)
    if p.is_dir() and not (p / "config.json").exists() and is_small_clip_checkpoint(p / CHECKPOINT_NAME):
        p = p / CHECKPOINT_NAME  # a `train-vision --out` folder
    if p.is_dir():
        from mindhier.vision.hf_clip import load_hf_clip  # imports transformers: only when needed

        return load_hf_clip(p, device=device, dtype=dtype)
    if is_small_clip_checkpoint(p):
        model = load_small_clip(p, device=device)
        return model.to(dtype=dtype) if dtype is not None else model
    weights, meta = paths_for(p)
    raise VisionError(
        f"{path} is neither a small-CLIP checkpoint ({weights.name} + {meta.name} written by "
        "`mindhier train-vision`) nor a CLIP folder in the Hugging Face layout (config.json, "
        "model.safetensors, tokenizer files). Train one with `mindhier train-vision --data WORLD "
        "--out runs/vision`, or download openai/clip-vit-large-patch14 on a machine with internet "
        "(`huggingface-cli download openai/clip-vit-large-patch14 --local-dir DIR`) and pass DIR."
    )
