"""Self-describing checkpoints: ``NAME.safetensors`` (tensors) + ``NAME.json`` (metadata).

The JSON records what the weights are (``kind``), the resolved config and its hash, the git
commit of the code that wrote them, and any manifest the caller adds (subject, sessions, data
manifest, training progress). Loading checks kind and config before touching the model, so a
checkpoint of another shape fails with a message naming the differing fields. Nothing is ever
unpickled: tensors come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mindhier.config import ConfigError, config_hash, diff_configs, to_dict
from mindhier.errors import MindhierError

FORMAT_VERSION = 1

# Tensors a training checkpoint carries besides the model's own weights (optimizer moments,
# RNG states, trainer buffers); `model_tensors` strips them so a loader sees only the model.
TRAINING_PREFIXES = ("optim.", "rng.", "train.")


class CheckpointError(MindhierError, ValueError):
    """A checkpoint that is missing, incomplete, or does not belong where it is loaded."""


def git_commit() -> str:
    """The commit of the source tree mindhier runs from ('unknown' outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        commit = out.stdout.strip()
        if out.returncode == 0 and commit:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=here, capture_output=True, text=True, timeout=5,
            ).stdout.strip()
            return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def paths_for(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, metadata) paths for a checkpoint given either file or the common stem."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_checkpoint(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    *,
    kind: str,
    config: Any,
    extra: dict | None = None,
) -> Path:
    """Write weights + metadata atomically (temp files then rename: a crash loses nothing)."""
    weights, meta_path = paths_for(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": to_dict(config) if not isinstance(config, dict) else config,
        "config_hash": config_hash(config) if not isinstance(config, dict) else None,
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    tmp_w, tmp_m = weights.with_suffix(".safetensors.tmp"), meta_path.with_suffix(".json.tmp")
    save_file(flat, str(tmp_w), metadata={"kind": kind})
    tmp_m.write_text(json.dumps(meta, indent=2, sort_keys=True))
    honour_umask(tmp_w, tmp_m)
    os.replace(tmp_w, weights)
    os.replace(tmp_m, meta_path)
    return weights


def current_umask() -> int:
    """The process umask. Linux reports it in /proc; elsewhere it can only be read by setting
    it, which is briefly visible to other threads, so that is the fallback."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(*paths: Path) -> None:
    """Give files the mode a plain ``open()`` would: 0o666 & ~umask. safetensors writes 0600
    (a private temp file), so on a shared cluster colleagues could read a checkpoint's .json
    but not its weights."""
    mode = 0o666 & ~current_umask()
    for p in paths:
        os.chmod(p, mode)


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON half of a checkpoint, with a clear error when it is missing or unreadable."""
    weights, meta_path = paths_for(path)
    if not meta_path.exists():
        raise CheckpointError(
            f"checkpoint metadata {meta_path} not found; a mindhier checkpoint is a pair "
            f"{weights.name} + {meta_path.name} written by a mindhier training command"
        )
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{meta_path} is not valid JSON ({err}); the file is damaged") from err


def load_checkpoint(
    path: str | os.PathLike,
    *,
    kind: str | None = None,
    config: Any = None,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, torch.Tensor], dict]:
    """Load (tensors, metadata), checking the kind and, if given, the expected config."""
    weights, meta_path = paths_for(path)
    meta = read_metadata(path)
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(
            f"{meta_path} holds a {meta.get('kind')!r} checkpoint, but a {kind!r} checkpoint "
            f"is needed here; check which file you passed"
        )
    if config is not None:
        check_config(meta, config, meta_path)
    if not weights.exists():
        raise CheckpointError(f"checkpoint weights {weights} not found next to {meta_path.name}")
    try:
        tensors = load_file(str(weights), device=str(device))
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {weights}: {err}; the file is damaged or truncated") from err
    return tensors, meta


def check_config(meta: dict, config: Any, where: Any = "checkpoint") -> None:
    """Raise a ConfigError naming every field where the checkpoint's config differs."""
    expected = to_dict(config)
    diffs = diff_configs(expected, meta.get("config", {}))
    if diffs:
        raise ConfigError(
            f"{where} was trained with another config:\n  " + "\n  ".join(diffs)
            + "\nLoad it with the config it records (its preset or JSON), or retrain."
        )


def model_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's own weights out of a checkpoint that may also carry training state."""
    return {k: v for k, v in tensors.items() if not k.startswith(TRAINING_PREFIXES)}


def load_state_strict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Any) -> None:
    """``load_state_dict(strict=True)`` with an error that names the offending keys/shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        def head(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" … (+{len(keys) - 8})" if len(keys) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {head(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {head(unexpected)}")
        if wrong:
            parts.append("shape mismatch: " + head(
                [f"{k} {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong]))
        raise CheckpointError(f"{where} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(tensors, strict=True)


def optimizer_to_tensors(opt: torch.optim.Optimizer, prefix: str = "optim.") -> tuple[dict, dict]:
    """Flatten an optimizer state into safetensors-able tensors + JSON-able param groups."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            key = f"{prefix}{pid}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value.detach().clone()  # never alias the live state
            else:
                scalars[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(
    opt: torch.optim.Optimizer, tensors: dict, info: dict, prefix: str = "optim."
) -> None:
    """Inverse of :func:`optimizer_to_tensors`."""
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(info.get("scalars", {}).items()):
        if not key.startswith(prefix):
            continue
        pid, name = key[len(prefix):].split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})
