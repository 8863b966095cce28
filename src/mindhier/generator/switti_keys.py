"""Starting the generator from released Switti weights (paper §4.1: stage 2 is "pretrained by
Switti"; SPEC §5).

The one table from Switti's state-dict names to ours is :data:`SWITTI_TO_MINDHIER`. Keys that
have no place in mindhier are listed in :data:`NOT_USED` with the reason. :func:`load_switti_weights`
loads what fits and returns a :class:`SwittiLoadReport` that accounts for *every* key of the
checkpoint and every parameter of the model: loaded, re-initialised (with why), or not used
(with why). Nothing is dropped silently; a key that is in neither table is an error (the file
is not a Switti checkpoint).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mindhier.errors import MindhierError

# Switti key (regex) → mindhier key (template). ``{i}`` is the block index.
SWITTI_TO_MINDHIER: list[tuple[str, str]] = [
    (r"word_embed\.(weight|bias)", r"token_embed.\1"),
    (r"text_pooler\.(weight|bias)", r"cond_proj.\1"),
    (r"pos_start", r"start_pos"),
    (r"lvl_embed\.weight", r"scale_embed.weight"),
    (r"head_nm\.ada_lin\.1\.(weight|bias)", r"head.adaln.\1"),
    (r"head\.(weight|bias)", r"head.proj.\1"),
    (r"blocks\.(\d+)\.attn\.to_qkv\.(weight|bias)", r"blocks.\1.self_attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"blocks.\1.self_attn.out.\2"),
    (r"blocks\.(\d+)\.cross_attn\.to_q\.(weight|bias)", r"blocks.\1.cross_attn.q.\2"),
    (r"blocks\.(\d+)\.cross_attn\.to_kv\.(weight|bias)", r"blocks.\1.cross_attn.kv.\2"),
    (r"blocks\.(\d+)\.cross_attn\.proj\.(weight|bias)", r"blocks.\1.cross_attn.out.\2"),
    (r"blocks\.(\d+)\.ffn\.gate_proj\.weight", r"blocks.\1.ffn.gate.weight"),
    (r"blocks\.(\d+)\.ffn\.up_proj\.weight", r"blocks.\1.ffn.up.weight"),
    (r"blocks\.(\d+)\.ffn\.down_proj\.weight", r"blocks.\1.ffn.down.weight"),
    (r"blocks\.(\d+)\.self_attention_norm1\.weight", r"blocks.\1.self_attn_pre_norm.weight"),
    (r"blocks\.(\d+)\.self_attention_norm2\.weight", r"blocks.\1.self_attn_post_norm.weight"),
    (r"blocks\.(\d+)\.cross_attention_norm1\.weight", r"blocks.\1.cross_attn_pre_norm.weight"),
    (r"blocks\.(\d+)\.cross_attention_norm2\.weight", r"blocks.\1.cross_attn_post_norm.weight"),
    (r"blocks\.(\d+)\.ffn_norm1\.weight", r"blocks.\1.ffn_pre_norm.weight"),
    (r"blocks\.(\d+)\.ffn_norm2\.weight", r"blocks.\1.ffn_post_norm.weight"),
    (r"blocks\.(\d+)\.attention_y_norm\.weight", r"blocks.\1.context_norm.weight"),
    (r"blocks\.(\d+)\.ada_lin\.1\.(weight|bias)", r"blocks.\1.adaln.\2"),
]

# Switti keys with no counterpart here (regex → reason).
NOT_USED: list[tuple[str, str]] = [
    (r"lvl_1L", "derived buffer (scale index of each token); rebuilt from this model's schedule"),
    (r"attn_bias_for_masking", "derived buffer (same-scale attention mask); rebuilt from this model's schedule"),
    (r"blocks\.\d+\.crop_cond_scales|crop_embed\.weight|crop_proj\.(weight|bias)",
     "Switti's crop/original-size conditioning for text-to-image training at many aspect ratios; "
     "mindhier conditions on fMRI only (square stimuli), so it is not used"),
]

# Why a mapped key can have another shape here (matched on our key).
SHAPE_REASONS: list[tuple[str, str]] = [
    (r"blocks\.\d+\.cross_attn\.kv\.weight|blocks\.\d+\.context_norm\.weight",
     "context width differs: Switti's context is 2048 = CLIP-L 768 + CLIP-bigG 1280 text tokens, "
     "mindhier's is the encoder's fMRI tokens ({ours} wide); re-initialised"),
    (r"cond_proj\.weight",
     "the fMRI pooler: Switti pools CLIP-bigG text (1280), mindhier pools e_M ({ours} wide); re-initialised"),
    (r"token_embed\.weight|head\.proj\.(weight|bias)",
     "the tokenizer differs (latent width / vocabulary); re-initialised"),
    (r"scale_embed\.weight|start_pos", "the scale schedule differs; re-initialised"),
]


class SwittiWeightsError(MindhierError, ValueError):
    """A file that is not (or not readable as) a Switti generator checkpoint."""


def switti_key_to_ours(key: str) -> str | None:
    """Our parameter name for a Switti key, or None when the key is not used here."""
    for pattern, template in SWITTI_TO_MINDHIER:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, template, key)
    return None


def not_used_reason(key: str) -> str | None:
    for pattern, reason in NOT_USED:
        if re.fullmatch(pattern, key):
            return reason
    return None


def shape_reason(our_key: str, ours: tuple, theirs: tuple) -> str:
    for pattern, reason in SHAPE_REASONS:
        if re.fullmatch(pattern, our_key):
            return f"shape {theirs} in the checkpoint vs {ours} here: " + reason.format(ours=ours[-1])
    return f"shape {theirs} in the checkpoint vs {ours} here; re-initialised"


@dataclass
class SwittiLoadReport:
    """Where every key went. ``reinitialised`` and ``not_used`` map key → reason; keys of the
    model that the checkpoint does not provide at all are in ``reinitialised`` too."""

    loaded: list[str] = field(default_factory=list)           # our keys
    reinitialised: dict[str, str] = field(default_factory=dict)  # our key → reason
    not_used: dict[str, str] = field(default_factory=dict)       # Switti key → reason

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from the Switti checkpoint"]
        if self.reinitialised:
            lines.append(f"re-initialised {len(self.reinitialised)}:")
            lines += [f"  {k}: {r}" for k, r in sorted(self.reinitialised.items())]
        if self.not_used:
            lines.append(f"not used {len(self.not_used)}:")
            lines += [f"  {k}: {r}" for k, r in sorted(self.not_used.items())]
        return "\n".join(lines)


def read_switti_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a released Switti checkpoint (safetensors; nothing is unpickled)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise SwittiWeightsError(f"Switti checkpoint {path} not found")
    if path.suffix != ".safetensors":
        raise SwittiWeightsError(
            f"{path}: only .safetensors Switti checkpoints are read (pickled .pt/.bin files are "
            f"never unpickled); the Hugging Face release 'yresearch/Switti' ships model.safetensors")
    return load_file(str(path))


def load_switti_weights(model: torch.nn.Module,
                        source: str | os.PathLike | dict[str, torch.Tensor]) -> SwittiLoadReport:
    """Copy a Switti checkpoint (path or state dict) into ``model`` through the key table.

    Tensors whose shape differs keep the model's initialisation (reason recorded). Works on
    meta-device models (nothing is materialised)."""
    state = source if isinstance(source, dict) else read_switti_state(source)
    own = dict(model.named_parameters())
    report = SwittiLoadReport()
    unknown, plan = [], {}
    for key, tensor in state.items():
        ours = switti_key_to_ours(key)
        if ours is None:
            reason = not_used_reason(key)
            if reason is None:
                unknown.append(key)
            else:
                report.not_used[key] = reason
        elif ours not in own:
            report.not_used[key] = f"maps to {ours}, which this model (depth {len(model.blocks)}) does not have"
        elif tuple(own[ours].shape) != tuple(tensor.shape):
            report.reinitialised[ours] = shape_reason(ours, tuple(own[ours].shape), tuple(tensor.shape))
        else:
            plan[ours] = tensor
    # A bias is only meaningful with its own weight: re-initialise it along with the weight.
    for ours in list(plan):
        weight = ours[: -len(".bias")] + ".weight" if ours.endswith(".bias") else None
        if weight in report.reinitialised:
            report.reinitialised[ours] = f"bias of {weight}, which is re-initialised"
            del plan[ours]
    if unknown:
        head = ", ".join(unknown[:8]) + (f" … (+{len(unknown) - 8})" if len(unknown) > 8 else "")
        raise SwittiWeightsError(
            f"not a Switti generator checkpoint: {len(unknown)} keys have no known meaning ({head}); "
            f"pass the Switti transformer weights (not the VQ-VAE or a mindhier checkpoint)")
    with torch.no_grad():
        for ours, tensor in plan.items():
            own[ours].copy_(tensor.to(own[ours].dtype))
            report.loaded.append(ours)
    covered = set(report.loaded) | set(report.reinitialised)
    for name in own:
        if name not in covered:
            report.reinitialised[name] = "not in the checkpoint; keeps its fresh initialisation"
    return report
