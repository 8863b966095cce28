"""The foundation generator: the scale-aware generator pretrained on the corpus (SPEC §1.4).

MindHier's stage 2 fine-tunes Switti, a generator that can already draw. The demo's stand-in is
the same ``ScaleAwareGenerator`` pretrained by ``mindhier pretrain-generator`` with the image's
**own** vision hierarchy v_{g_1..g_M} as its condition, routed scale-aware exactly as the
encoder's e_1..e_M are later. Stage 2 on fMRI then starts from it (``train-generator --init``).
This module says what such a checkpoint records and whether it fits a stage-2 run.
"""

from __future__ import annotations

import dataclasses

from mindhier.config import from_dict
from mindhier.errors import MindhierError
from mindhier.generator.config import GeneratorConfig

# Fields a generator shares with its frozen tokenizer and encoder: they must agree exactly.
INTERFACE_FIELDS = ("scales", "vocab_size", "z_channels", "context_dim", "pooled_dim", "num_levels",
                    "tokens_per_level")


class InitMismatchError(MindhierError, ValueError):
    pass


def vision_record(vision, layers) -> dict:
    """What a pretrained generator records of the vision model it was conditioned on."""
    return {"identity": vision.identity(), "layers": [int(g) for g in layers]}


def null_levels(levels: list) -> list:
    """The unconditional input of a pretrained generator (its CFG null): every level all zeros."""
    return [v.new_zeros(v.shape) for v in levels]


def check_init_matches(init_meta: dict, cfg: GeneratorConfig, enc_meta: dict, tok_meta: dict, where) -> GeneratorConfig:
    """The config of a stage-2 run that starts from the generator checkpoint ``where``.

    Refuses an init generator pretrained on another vision model or layers than the encoder was
    aligned to, or on another tokenizer, or of another interface; keeps its body (depth, width,
    level_norm, …) and takes routing and condition dropout from this run."""
    from mindhier.reconstruct import checkpoint_identity

    problems = []
    init_cfg = from_dict(GeneratorConfig, init_meta["config"])
    for name in INTERFACE_FIELDS:
        if getattr(init_cfg, name) != getattr(cfg, name):
            problems.append(f"{name}: init has {getattr(init_cfg, name)!r}, this run needs {getattr(cfg, name)!r}")
    if init_meta.get("tokenizer") != checkpoint_identity(tok_meta):
        problems.append("it was trained on another tokenizer than --tokenizer")
    pretrain = init_meta.get("pretrain")
    enc_vision = enc_meta.get("vision", {})
    if pretrain is not None:
        if pretrain["vision"]["identity"] != enc_vision.get("identity"):
            problems.append("it was pretrained on another vision model than the encoder was aligned to")
        if list(pretrain["vision"]["layers"]) != list(enc_vision.get("layers", [])):
            problems.append(f"it was conditioned on vision layers {pretrain['vision']['layers']}, the encoder "
                            f"predicts layers {enc_vision.get('layers')}")
    if problems:
        raise InitMismatchError(f"--init {where} does not fit this stage-2 run:\n  " + "\n  ".join(problems)
                                + "\nPretrain a generator on this encoder's vision model and this tokenizer "
                                  "(`mindhier pretrain-generator`), or pass the matching checkpoints.")
    return dataclasses.replace(init_cfg, routing=cfg.routing, cond_drop_prob=cfg.cond_drop_prob)


def draw_from_own_features(generator, tokenizer, vision, layers, images01, image_ids, settings, batch: int = 25):
    """A pretrained generator's single-shot drawing of each image from that image's own vision
    hierarchy v_{g_1..g_M} (its training task: the "oracle" of the report), CFG against the
    all-zero condition. ``images01`` (N, 3, H, W) on the models' device; returns them on the CPU."""
    import torch

    from mindhier.sampling import reconstruct

    out = []
    with torch.no_grad():
        for start in range(0, len(images01), batch):
            chunk = images01[start: start + batch]
            levels = [v.float() for v in vision.image_layer_features(chunk, list(layers))]
            cond, null = generator.condition(levels), generator.condition(null_levels(levels))
            drawn = reconstruct(generator, tokenizer, cond, null, settings, list(image_ids[start: start + batch]))
            out.append(drawn.single_shot.float().cpu())
    return torch.cat(out)
