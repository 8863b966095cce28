"""Where code runs: the device, the process group, and bf16 autocast.

One module for the library's commands (`reconstruct`) and the training loops alike. Under
`torchrun` (RANK / WORLD_SIZE / LOCAL_RANK set) a process joins the group torchrun prepared
(gloo on CPU; on CUDA nccl for CUDA tensors, gloo for CPU ones); with plain `python` it is
rank 0 of 1 and never touches torch.distributed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group torchrun prepared, or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=process_group_backend(dev))
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev)


def process_group_backend(device: torch.device) -> str:
    """gloo on CPU; on CUDA, NCCL for CUDA tensors and gloo for CPU ones. NCCL alone refuses
    CPU tensors ("No backend type associated with device type cpu"), and the loops reduce
    some host-side statistics (train-generator's loss and accuracy) as CPU tensors."""
    return "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"


def shutdown(d: Dist, failed: BaseException | None = None) -> None:
    """Leave the process group. Under gloo, interpreter teardown can abort after
    destroy_process_group (SPEC §7), so worker processes flush and exit hard — with code 0 only
    on success. On failure a rank prints its traceback and exits non-zero at once (no barrier,
    which the other ranks might never reach); torchrun then stops the rest."""
    if not (d.enabled and dist.is_initialized()):
        return
    if failed is not None:
        if _is_user_error(failed):
            print(f"rank {d.rank}: error: {failed}", file=sys.stderr)
        else:
            traceback.print_exception(failed, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2 if _is_user_error(failed) else 1)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _is_user_error(err: BaseException) -> bool:
    from mindhier.errors import MindhierError

    return isinstance(err, MindhierError)


@contextlib.contextmanager
def distributed_session(device: str = "auto"):
    """``with distributed_session(args.device) as d: ...`` — joins, and leaves correctly on
    success and on failure (see :func:`shutdown`)."""
    d = init_distributed(device)
    try:
        yield d
    except BaseException as err:
        shutdown(d, failed=err)
        raise
    shutdown(d)


def cpu_has_fast_bf16() -> bool:
    """AVX-512 bf16 or AMX: bf16 matmuls ≈4× fp32 here (SPEC §8); fp16 is never used on CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_is_fast(device: torch.device) -> bool:
    """CUDA with bf16 support, or a CPU with native bf16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16()


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast where it pays (see :func:`bf16_is_fast`), else a no-op context."""
    if enabled and bf16_is_fast(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def platform_fingerprint() -> dict:
    """What decides whether two runs' floating-point results can be identical: the PyTorch
    build, the CPU model and its bf16 support (which selects the kernels, and the bf16 autocast
    of ``precision="auto"``), and the intra-op thread count (reduction splits)."""
    import platform

    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
    except OSError:
        cpu = platform.processor()
    return {"torch": torch.__version__, "machine": platform.machine(), "cpu": cpu,
            "fast_bf16": cpu_has_fast_bf16(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
