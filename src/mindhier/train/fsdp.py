"""Stage 2 across processes (SPEC §7): FSDP2 (``fully_shard`` per block, then the root) or DDP,
the full weights gathered for code outside ``forward`` (sampling), and the optimizer state as
flat tensors for a checkpoint. Used by train-generator and pretrain-generator."""

from __future__ import annotations

import contextlib

import torch

from mindhier.train.distributed import Dist


def parallelize(model: torch.nn.Module, d: Dist, how: str) -> torch.nn.Module:
    """FSDP2 (each block its own unit, then the root) or DDP; the model itself when alone."""
    if not d.enabled:
        return model
    if how == "fsdp":
        import warnings

        from torch.distributed.fsdp import fully_shard

        # The logits are a view of the head's matmul output; nothing modifies them in place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    ids = [d.device.index] if d.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


@contextlib.contextmanager
def full_weights(model: torch.nn.Module):
    """Gather FSDP-sharded weights for code outside ``forward`` (sampling); every rank enters."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()


def state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def optimizer_tensors(model, opt) -> tuple[dict, dict]:
    """Full (unsharded) optimizer state as flat tensors ``optim.{param}.{name}`` + JSON groups."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, opt, options=state_options(cpu_offload=True))
    tensors = {f"optim.{fqn}.{name}": v for fqn, st in sd.get("state", {}).items() for name, v in st.items()}
    return tensors, {"param_groups": sd.get("param_groups", [])}


def restore_optimizer(model, opt, tensors: dict, info: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            fqn, name = key[len("optim."):].rsplit(".", 1)
            state.setdefault(fqn, {})[name] = value
    set_optimizer_state_dict(model, opt, {"state": state, "param_groups": info["param_groups"]},
                             options=state_options())
