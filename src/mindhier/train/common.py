"""Pieces every training loop shares: optimiser groups, LR schedule, autocast, loss guard,
progress bar, seeding, the JSON-lines log (mirrored to TensorBoard when it is installed), its
curves, and every rank's RNG state for an exact resume."""

from __future__ import annotations

import atexit
import json
import math
import random
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mindhier.errors import MindhierError
from mindhier.runtime import autocast, cpu_has_fast_bf16  # noqa: F401  (re-exported for the loops)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases, norms, embeddings' 1-D params (SPEC §3)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def warmup_cosine(step: int, total: int, warmup: int, base_lr: float, min_ratio: float = 0.0) -> float:
    """Linear warmup to base_lr, then cosine decay to min_ratio·base_lr at ``total``."""
    if total <= 0:
        return base_lr
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


class NonFiniteLoss(MindhierError, RuntimeError):
    """Training diverged: the message says when and what to change."""


def check_finite(loss: torch.Tensor, step: int, max_bad: int, state: dict) -> bool:
    """Finite-loss guard: skip a step with a NaN/inf loss; stop after ``max_bad`` in a row.
    Returns True when the step may proceed."""
    if torch.isfinite(loss).all():
        state["bad"] = 0
        return True
    state["bad"] = state.get("bad", 0) + 1
    if state["bad"] >= max_bad:
        raise NonFiniteLoss(
            f"loss was not finite for {max_bad} steps in a row (last at step {step}); "
            "lower the learning rate or check the inputs for NaN/inf"
        )
    return False


def progress(iterable=None, *, total=None, desc: str = "", enabled: bool = True, **kw):
    """A tqdm bar on the main process only (silent on other ranks)."""
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, dynamic_ncols=True, **kw)


def grad_norm(model: torch.nn.Module) -> float:
    """Global L2 norm of the gradients, with one host sync (not one per parameter)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.get_total_norm(grads, norm_type=2.0))


def trim_log(path, step: int) -> None:
    """A fresh run starts its JSON-lines log anew; a resumed one drops the lines written after
    the checkpoint it resumes (they will be redone), in TensorBoard too."""
    path = Path(path)
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))
    _PURGE_STEP[path.parent.resolve()] = step


def append_log(out, record: dict) -> None:
    """One record (a dict with "step") as a line of OUT/log.jsonl, and its numbers as
    TensorBoard scalars in OUT/tensorboard when the tensorboard package is importable."""
    with open(Path(out) / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    writer = _tensorboard(out)
    if writer is not None:
        from mindhier.curves import scalars

        for name, value in scalars(record).items():
            writer.add_scalar(name, value, record["step"])


# TensorBoard is optional (not a dependency): used when importable, with one writer per run
# folder. A resumed run purges the events after its step, as trim_log drops its lines.
_WRITERS: dict = {}
_PURGE_STEP: dict = {}


def _tensorboard(out):
    key = Path(out).resolve()
    if key not in _WRITERS:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch raises it when the tensorboard package is absent
            _WRITERS[key] = None
        else:
            purge = _PURGE_STEP.get(key)
            _WRITERS[key] = SummaryWriter(str(key / "tensorboard"), purge_step=None if purge is None else purge + 1)
            atexit.register(_WRITERS[key].close)
    return _WRITERS[key]


def plot_curves(out) -> None:
    """Redraw OUT/curves.png from OUT/log.jsonl (called at every checkpoint) and flush
    TensorBoard. A failed drawing is reported, never fatal: the run matters more than its picture."""
    from mindhier.curves import write_curves

    writer = _WRITERS.get(Path(out).resolve())
    if writer is not None:
        writer.flush()
    try:
        write_curves(out)
    except Exception as err:  # noqa: BLE001
        print(f"warning: could not draw {Path(out) / 'curves.png'}: {type(err).__name__}: {err}", flush=True)


# ---- RNG state of every rank (dropout), saved with a checkpoint for an exact --resume ----------
def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def gather_rng(d) -> dict[str, torch.Tensor]:
    """Every rank's RNG state, gathered on rank 0 as ``rng.rank{r}.{cpu,cuda}`` tensors."""
    mine = {k: v.numpy().tobytes() for k, v in _rng_state(d.device).items()}
    states = [mine]
    if d.enabled:
        states = [None] * d.world_size
        torch.distributed.all_gather_object(states, mine)
    return {f"rng.rank{r}.{k}": torch.frombuffer(bytearray(v), dtype=torch.uint8)
            for r, s in enumerate(states) for k, v in s.items()}


def restore_rng(tensors: dict, d, saved_world: int, fallback_seed: int) -> None:
    """This rank's saved RNG state; reseeded from ``fallback_seed`` under another process count."""
    key = f"rng.rank{d.rank}.cpu"
    if saved_world != d.world_size or key not in tensors:
        # Another process count: the data order still resumes exactly, dropout noise cannot.
        if d.is_main:
            print(f"note: checkpoint was written by {saved_world} process(es), now {d.world_size}: "
                  "dropout RNG reseeded", flush=True)
        torch.manual_seed(fallback_seed)
        return
    torch.set_rng_state(tensors[key].clone())
    cuda_key = f"rng.rank{d.rank}.cuda"
    if d.device.type == "cuda" and cuda_key in tensors:
        torch.cuda.set_rng_state(tensors[cuda_key].clone(), d.device)
