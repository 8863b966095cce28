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
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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
    """Write weights + metadata so that a process killed at any instant leaves a complete pair.

    Both halves go to temporary files in the same folder first (fsynced) and carry the same
    random ``write_id`` (in the JSON and in the safetensors header). The rename of the .json is
    the commit; the rename of the weights follows. Killed before the commit, the old pair is
    untouched; killed between the two renames, the new weights wait in ``NAME.safetensors.tmp``
    and the next load or save finishes the rename (:func:`finish_interrupted_save`)."""
    weights, meta_path = paths_for(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    finish_interrupted_save(weights, meta_path)  # else this save would overwrite its weights
    write_id = uuid.uuid4().hex
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": to_dict(config) if not isinstance(config, dict) else config,
        "config_hash": config_hash(config) if not isinstance(config, dict) else None,
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
        "write_id": write_id,  # after extra: metadata copied from a loaded checkpoint carries an old one
    }
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    tmp_w, tmp_m = _temporary(weights), _temporary(meta_path)
    save_file(flat, str(tmp_w), metadata={"kind": kind, "write_id": write_id})
    _fsync(tmp_w)
    with open(tmp_m, "w") as f:
        f.write(json.dumps(meta, indent=2, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    honour_umask(tmp_w, tmp_m)
    os.replace(tmp_m, meta_path)  # the commit
    _fsync(weights.parent)
    _hang_for_tests(meta_path)
    finish_interrupted_save(weights, meta_path)
    if _write_id(weights) != write_id:
        raise CheckpointError(f"could not move {tmp_w.name} to {weights}; {meta_path.name} already names it")
    return weights


# Test hook (tests/test_crash_resume.py): with MINDHIER_TEST_HANG_IN_SAVE=N, the N-th save of
# the process stops right after its commit (the new .json in place, the new weights still a
# temporary file: the one instant where the final files disagree), says so on stderr and waits
# to be killed, so that a test can SIGKILL a training command exactly there. Unset, it costs nothing.
HANG_ENV = "MINDHIER_TEST_HANG_IN_SAVE"
_saves_so_far = 0


def _hang_for_tests(meta_path: Path) -> None:
    global _saves_so_far
    _saves_so_far += 1
    if _saves_so_far == int(os.environ.get(HANG_ENV) or 0):
        print(f"{HANG_ENV}: save {_saves_so_far} committed {meta_path}; waiting to be killed",
              file=sys.stderr, flush=True)
        time.sleep(3600)


def _temporary(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (so that after a power cut no rename
    survives without the data it names). Folders cannot be opened everywhere: best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_id(weights: Path) -> str | None:
    """The write id in a safetensors header (None: no file, no id, or unreadable)."""
    try:
        with safe_open(str(weights), "pt") as f:
            return (f.metadata() or {}).get("write_id")
    except Exception:  # safetensors raises its own error types; load_checkpoint reports them
        return None


def _meta_write_id(meta_path: Path) -> str | None:
    try:
        return json.loads(meta_path.read_text()).get("write_id")
    except (OSError, ValueError, AttributeError):
        return None


def finish_interrupted_save(weights: Path, meta_path: Path) -> bool:
    """Complete a save that was killed after its commit: move NAME.safetensors.tmp into place
    when it, not NAME.safetensors, belongs to the committed .json. True when it did."""
    tmp_w = _temporary(weights)
    if not tmp_w.exists():
        return False
    wanted = _meta_write_id(meta_path)
    if wanted is None or _write_id(weights) == wanted or _write_id(tmp_w) != wanted:
        return False  # nothing committed is waiting (a temp file of a save killed before its commit)
    try:
        os.replace(tmp_w, weights)
    except FileNotFoundError:
        return False  # another process (the writer itself, or another loader) finished it
    except OSError:
        return False  # a read-only folder: load_checkpoint reads the temporary file instead
    _fsync(weights.parent)
    return True


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
    wanted = meta.get("write_id")
    if wanted is not None:
        finish_interrupted_save(weights, meta_path)
        if _write_id(weights) != wanted and _write_id(_temporary(weights)) == wanted:
            weights = _temporary(weights)  # the rename failed (a read-only folder): the committed weights
    if not weights.exists():
        raise CheckpointError(f"checkpoint weights {weights} not found next to {meta_path.name}")
    tensors, found = _read_weights(weights, device)
    if wanted is not None and found is not None and found != wanted:
        raise CheckpointError(
            f"{meta_path.name} and {weights.name} in {weights.parent} come from different saves (write ids "
            f"{wanted} and {found}): the files were copied or edited one at a time; restore both from one save")
    return tensors, meta


def _read_weights(weights: Path, device) -> tuple[dict[str, torch.Tensor], str | None]:
    """(tensors, write id) from one open of the file, so both belong to the same version of it.
    Weights written before write ids, or copied by code that drops them, have none."""
    try:
        with safe_open(str(weights), "pt", device=str(device)) as f:
            found = (f.metadata() or {}).get("write_id")
            return {k: f.get_tensor(k) for k in f.keys()}, found
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {weights}: {err}; the file is damaged or truncated") from err


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
