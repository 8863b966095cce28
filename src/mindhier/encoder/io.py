"""Loading a trained encoder from a mindhier checkpoint (``kind: "encoder"``).

The checkpoint written by ``mindhier train-encoder`` holds the model weights (plain state-dict
keys) plus, for exact resume, the optimizer (``optim.*``) and RNG state (``rng.*``). Its JSON
records the resolved :class:`EncoderConfig`, the voxel count and subject it was trained on, and
the vision model's shape and layers; that is all it takes to rebuild the model here.
:func:`start_from` starts a new encoder, possibly of another subject, from such a checkpoint.
"""

from __future__ import annotations

import os

import torch

from mindhier.checkpoint import CheckpointError, load_checkpoint, load_state_strict, model_tensors, paths_for
from mindhier.config import diff_configs, from_dict, to_dict
from mindhier.encoder.model import EncoderConfig, HierarchicalFMRIEncoder, VisionShape
from mindhier.errors import MindhierError

KIND = "encoder"


class VoxelCountError(MindhierError, ValueError):
    """fMRI data whose voxel count differs from what the encoder was trained on."""


def check_voxels(meta: dict, num_voxels: int, subject: int | None, where: str | os.PathLike,
                 model: str = "an encoder", command: str = "train-encoder") -> None:
    """A clear error when data and checkpoint disagree on the voxel count (another subject?);
    ``model``/``command`` name what is subject-specific and how to train one (the low-level
    decoder of mindhier.lowlevel shares this check)."""
    trained = int(meta["num_voxels"])
    if trained != int(num_voxels):
        trained_on = meta.get("subject")
        raise VoxelCountError(
            f"{where} was trained on {trained} voxels (subject {trained_on}), but the data for "
            f"subject {subject} has {num_voxels} voxels; {model} is subject-specific: use the "
            f"checkpoint trained on subject {subject}, or train one with `mindhier {command} "
            f"--subject {subject}`"
        )


def encoder_from_meta(meta: dict, device: str | torch.device = "cpu") -> HierarchicalFMRIEncoder:
    """An untrained model of exactly the checkpoint's shape."""
    for key in ("config", "num_voxels", "vision"):
        if key not in meta:
            raise CheckpointError(f"encoder checkpoint metadata lacks {key!r}; it was not written by train-encoder")
    cfg = from_dict(EncoderConfig, meta["config"])
    shape = from_dict(VisionShape, meta["vision"]["shape"])
    return HierarchicalFMRIEncoder(cfg, int(meta["num_voxels"]), shape).to(device)


def load_encoder(
    path: str | os.PathLike,
    *,
    num_voxels: int | None = None,
    subject: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[HierarchicalFMRIEncoder, dict]:
    """(model in eval mode, metadata) from ``path`` (either file of the pair, or their stem).

    Pass ``num_voxels`` (and ``subject``) of the data you will feed it to fail early and clearly
    when they do not match the checkpoint."""
    tensors, meta = load_checkpoint(path, kind=KIND)
    where = paths_for(path)[0]
    if num_voxels is not None:
        check_voxels(meta, num_voxels, subject, where)
    model = encoder_from_meta(meta)
    load_state_strict(model, model_tensors(tensors), where)
    return model.to(device).eval(), meta


def start_from(path: str | os.PathLike, model: HierarchicalFMRIEncoder, subject: int, vision: dict) -> dict:
    """Load the encoder checkpoint ``path`` into ``model`` (a fresh encoder of ``subject``,
    aligned to ``vision``: train-encoder's record of its vision model) and return what to record.

    Every weight is reused except, for another subject or voxel count, the subject-specific input
    layer (``model.INPUT_LAYER``), which keeps its fresh initialisation: the new-subject recipe
    (docs/new_subject.md), like MindEye2's shared-subject model and the official code's
    multi-subject encoder. Refuses a checkpoint of another shape or vision model, since the
    reused levels would then be aligned to other targets."""
    tensors, meta = load_checkpoint(path, kind=KIND)
    where = paths_for(path)[1]
    problems = diff_configs(to_dict(model.cfg), meta.get("config", {}))
    theirs = meta.get("vision", {})
    problems += [f"vision {key}: this run {vision.get(key)!r}, the checkpoint {theirs.get(key)!r}"
                 for key in ("identity", "shape", "layers", "final_layer") if theirs.get(key) != vision.get(key)]
    if problems:
        raise MindhierError(f"--init {where} does not fit this run:\n  " + "\n  ".join(problems)
                            + "\nPass the --preset, --supervision, --tau, --vision and --layer-map it was trained "
                              "with, or start without --init.")
    same_input = meta.get("subject") == subject and int(meta["num_voxels"]) == model.num_voxels
    fresh = [] if same_input else [k for k in model.state_dict() if k.startswith(model.INPUT_LAYER + ".")]
    weights = {**model_tensors(tensors), **{k: model.state_dict()[k] for k in fresh}}
    load_state_strict(model, weights, where)
    from mindhier.pipeline import checkpoint_identity

    return {"path": str(path), "identity": checkpoint_identity(meta), "subject": meta.get("subject"),
            "num_voxels": int(meta["num_voxels"]), "reinitialised": fresh}
