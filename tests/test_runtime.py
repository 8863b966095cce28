"""Joining and leaving the process group: success exits 0, a failing rank exits non-zero."""

import subprocess
import sys
import textwrap

import torch

from mindhier.runtime import autocast, distributed_session, resolve_device

SCRIPT = textwrap.dedent("""
    import sys
    import torch.distributed as dist
    from mindhier.errors import MindhierError
    from mindhier.runtime import distributed_session

    with distributed_session("cpu") as d:
        dist.barrier()
        if sys.argv[1] == "fail" and d.rank == 1:
            raise MindhierError("boom on purpose")
        print(f"rank {d.rank} of {d.world_size} done", flush=True)
""")


def _torchrun(tmp_path, mode):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), mode]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_two_ranks_finish_cleanly(tmp_path):
    res = _torchrun(tmp_path, "ok")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "rank 0 of 2 done" in res.stdout and "rank 1 of 2 done" in res.stdout


def test_a_failing_rank_ends_the_job_non_zero_with_its_message(tmp_path):
    res = _torchrun(tmp_path, "fail")
    assert res.returncode != 0
    assert "rank 1: error: boom on purpose" in res.stderr


def test_single_process_session_needs_no_process_group(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with distributed_session("cpu") as d:
        assert (d.rank, d.world_size, d.enabled) == (0, 1, False)
    assert not torch.distributed.is_initialized()


def test_autocast_is_a_no_op_when_disabled():
    with autocast(resolve_device("cpu"), enabled=False):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32
