"""`mindhier import-tokenizer`: turn released VAR / Switti VQ-VAE weights into a mindhier
tokenizer checkpoint (``OUT/tokenizer.safetensors`` + ``.json``) that every other command reads.

    mindhier import-tokenizer --weights vae_ch160v4096z32.pth --preset paper --out models/vqvae_switti

The weights are checked key by key and shape by shape against the preset (VAR's
``vae_ch160v4096z32`` = ``paper`` for the 512-px schedule Switti uses, ``paper256`` for VAR's
256-px one); a ``.pth`` file is read with ``torch.load(weights_only=True)``, never unpickled.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mindhier.checkpoint import save_checkpoint
from mindhier.config import get_preset
from mindhier.errors import MindhierError
from mindhier.tokenizer.config import PRESETS
from mindhier.tokenizer.io import CHECKPOINT_KIND, load_vqvae_state_dict
from mindhier.tokenizer.model import MultiScaleVQVAE


def import_weights(weights: str | Path, preset: str, out: str | Path, force: bool = False) -> Path:
    """Strictly load ``weights`` into the ``preset`` model and save it as a mindhier checkpoint."""
    target = Path(out) / "tokenizer"
    if target.with_suffix(".json").exists() and not force:
        raise MindhierError(f"{target}.json exists; choose another --out or pass --force")
    cfg = get_preset(PRESETS, preset, "tokenizer")
    model = load_vqvae_state_dict(MultiScaleVQVAE(cfg), weights)
    return save_checkpoint(target, model.state_dict(), kind=CHECKPOINT_KIND, config=cfg,
                           extra={"imported_from": str(weights), "step": 0})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, help="VAR/Switti VQ-VAE weights (.safetensors, or .pth)")
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS),
                   help="architecture + scale schedule the weights belong to (paper: 512 px)")
    p.add_argument("--out", required=True, help="output folder (writes OUT/tokenizer.safetensors + .json)")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT/tokenizer checkpoint")


def run(args: argparse.Namespace) -> int:
    path = import_weights(args.weights, args.preset, args.out, args.force)
    print(f"imported {args.weights} as a {args.preset!r} tokenizer: {path}")
    return 0
