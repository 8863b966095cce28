"""Named training recipes: the schedule of stage 1 and stage 2 (epochs or steps, global batch,
learning rate, warm-up, weight decay, …) as one choice, ``--recipe``, beside ``--preset`` (the
model's size).

``paper`` is the paper's appendix E, and where the paper is silent the official code
(github.com/XuZhang2/MindHier, commit 7c900fc); every value says which. ``demo`` is this
toolkit's default, sized for the synthetic world on a laptop. A flag given on the command line
always wins over the recipe; the resolved values and the recipe's name are what the checkpoint
records, so a resume with another recipe is refused like any other changed setting.

Where the official code differs from the paper, the paper is followed and the difference is
written down here (``official``), so a user reproducing the official numbers knows what to pass:

    stage 1   paper 300 epochs at batch 512 (8 GPUs x 64)   official brainencoder/train.py: 100 epochs,
              64 per process, OneCycleLR (2 warm-up epochs, cosine to lr/25000), weight decay 0.01
    stage 2   paper 9k steps at batch 80                     official MindHier/utils/arg_util.py: bs 768,
              weight decay 0 (twd), grad clip 1.0 (tclip), uncond 0.1, base lr 1e-4 (tblr)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

PAPER = "paper App. E"
OFFICIAL_ENCODER = "official brainencoder/train.py (paper silent)"
OFFICIAL_GENERATOR = "official MindHier/utils/arg_util.py (paper silent)"
TOOLKIT = "this toolkit (paper and official code silent)"


@dataclass(frozen=True)
class Value:
    value: object
    source: str
    official: object = None  # the official code's value where it differs from the recipe's


# Stage 1 (train-encoder). Warm-up is a fraction of all steps; the official OneCycleLR warms up for
# pct_start = 2 / num_epochs, i.e. two epochs, which at the paper's 300 epochs is 2/300.
ENCODER: dict[str, dict[str, Value]] = {
    "paper": {
        "epochs": Value(300, PAPER, official=100),
        "global_batch": Value(512, PAPER, official="64 per process"),
        "lr": Value(1e-4, PAPER),
        "weight_decay": Value(0.01, OFFICIAL_ENCODER),
        "warmup": Value(2 / 300, OFFICIAL_ENCODER + ": two epochs (OneCycleLR pct_start = 2/epochs)"),
    },
    "demo": {
        "epochs": Value(20, TOOLKIT),
        "global_batch": Value(64, TOOLKIT),
        "lr": Value(1e-4, PAPER),
        "weight_decay": Value(0.01, OFFICIAL_ENCODER),
        "warmup": Value(0.05, TOOLKIT),
    },
}

# Stage 2 (train-generator). AdamW (0.9, 0.95) and cosine decay after a linear warm-up are fixed
# (paper App. E); the paper states no warm-up length and the official default depends on its
# launch arguments, so 100 steps (about 1 % of 9k) is ours.
GENERATOR: dict[str, dict[str, Value]] = {
    "paper": {
        "steps": Value(9000, PAPER),
        "global_batch": Value(80, PAPER, official=768),
        "lr": Value(1e-4, PAPER),
        "weight_decay": Value(0.0, OFFICIAL_GENERATOR),
        "warmup": Value(100, TOOLKIT),
        "grad_clip": Value(1.0, OFFICIAL_GENERATOR),
        "cond_drop": Value(0.1, OFFICIAL_GENERATOR),
        "crop": Value("resize-crop", PAPER + ": random 512 crops (official: Resize 576, Lanczos -> RandomCrop 512)"),
    },
    "demo": {
        "steps": Value(2000, TOOLKIT),
        "global_batch": Value(32, TOOLKIT),
        "lr": Value(1e-4, PAPER),
        "weight_decay": Value(0.05, TOOLKIT),
        "warmup": Value(100, TOOLKIT),
        "grad_clip": Value(1.0, OFFICIAL_GENERATOR),
        "cond_drop": Value(0.1, OFFICIAL_GENERATOR),
        "crop": Value("none", TOOLKIT + ": whole images, tokens cached once (the cheap path)"),
    },
}

STAGES = {"encoder": ENCODER, "generator": GENERATOR}
DEFAULT = "demo"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_recipe_argument(p: argparse.ArgumentParser, stage: str) -> None:
    """``--recipe``; call after the flags it governs were added with ``default=None``."""
    recipes = STAGES[stage]
    lines = [f"{name}: " + ", ".join(f"{flag(k)} {v.value:g}" if isinstance(v.value, float) else f"{flag(k)} {v.value}"
                                     for k, v in values.items()) for name, values in recipes.items()]
    p.add_argument("--recipe", default=DEFAULT, choices=sorted(recipes),
                   help="training schedule; a flag given explicitly overrides it. " + "; ".join(lines)
                        + " (sources in mindhier.train.recipes)")


def recipe_help(stage: str, key: str, text: str) -> str:
    """A governed flag's help: what it does, then each recipe's value."""
    values = ", ".join(f"{name} {values[key].value}" for name, values in STAGES[stage].items())
    return f"{text} (default: the recipe's; {values})"


def resolve(args: argparse.Namespace, stage: str) -> dict[str, str]:
    """Fill every governed flag left at None with the recipe's value; returns (and keeps in
    ``args.recipe_sources``) where each came from, ``command line`` or the recipe's source, for
    the checkpoint. Resolving twice changes nothing; a command without ``--recipe``
    (pretrain-generator, which shares stage 2's loop) has nothing to resolve."""
    if getattr(args, "recipe_sources", None) is not None:
        return args.recipe_sources
    if getattr(args, "recipe", None) is None:
        args.recipe_sources = {}
        return args.recipe_sources
    recipe = STAGES[stage][args.recipe]
    sources = {}
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value.value)
            sources[key] = f"recipe {args.recipe}: {value.source}"
        else:
            sources[key] = "command line"
    args.recipe_sources = sources
    return sources
