"""Loading tokenizer weights: mindhier checkpoints, and a user's real VAR/Switti VQ-VAE.

Real weights: VAR's ``vae_ch160v4096z32.pth`` and Switti's VQ-VAE have exactly the state-dict
keys of the ``paper`` preset (SPEC §4). Prefer a ``.safetensors`` file; a ``.pth`` is read with
``torch.load(weights_only=True)`` (tensors only, never arbitrary pickled objects).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from mindhier.checkpoint import CheckpointError, load_checkpoint, load_state_strict, model_tensors
from mindhier.config import from_dict
from mindhier.tokenizer.config import VQVAEConfig
from mindhier.tokenizer.model import MultiScaleVQVAE

CHECKPOINT_KIND = "tokenizer"


def load_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu",
                   config: VQVAEConfig | None = None) -> MultiScaleVQVAE:
    """A tokenizer from a mindhier checkpoint (``X.safetensors`` + ``X.json``), in eval mode.

    The config recorded in the JSON builds the model; if ``config`` is given the checkpoint
    must have been trained with exactly that config (else a ConfigError lists the fields)."""
    tensors, meta = load_checkpoint(path, kind=CHECKPOINT_KIND, config=config, device="cpu")
    cfg = config or from_dict(VQVAEConfig, meta["config"])
    model = MultiScaleVQVAE(cfg)
    load_state_strict(model, model_tensors(tensors), where=path)
    return model.to(device).eval()


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``.pth`` file (the latter with weights_only=True)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"VQ-VAE weights {p} not found")
    if p.suffix == ".safetensors":
        return load_file(str(p))
    if p.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as err:  # an unpicklable object means it is not a plain state dict
            raise CheckpointError(
                f"cannot read {p} as a plain state dict ({err}); export it to .safetensors "
                "(safetensors.torch.save_file(state_dict, ...)) and pass that file"
            ) from err
        for wrapper in ("state_dict", "model", "vae"):  # common wrappers around a state dict
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise CheckpointError(f"{p} does not hold a flat state dict of tensors")
        return state
    raise CheckpointError(f"{p}: unknown weights format {p.suffix!r}; use .safetensors (or .pth)")


def load_vqvae_state_dict(model: MultiScaleVQVAE, path: str | os.PathLike) -> MultiScaleVQVAE:
    """Load real VAR/Switti VQ-VAE weights into ``model`` with strict key and shape checks
    (the ``paper`` preset for ``vae_ch160v4096z32`` at 512 px; ``paper256`` at 256 px)."""
    load_state_strict(model, read_state_dict(path), where=path)
    return model
