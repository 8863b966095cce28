"""CLI dispatch and the distributed/training helpers."""

import pytest
import torch

from mindhier import cli
from mindhier.train.common import warmup_cosine
from mindhier.train.distributed import init_distributed, split_global_batch


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_split_global_batch():
    assert split_global_batch(64, 2) == (32, 1)
    assert split_global_batch(64, 2, max_per_rank=8) == (8, 4)
    assert split_global_batch(96, 2, max_per_rank=20) == (16, 3)  # any exact divisor, not only powers of 2
    with pytest.raises(ValueError, match="not divisible"):
        split_global_batch(63, 2)


def test_warmup_cosine_shape():
    lrs = [warmup_cosine(s, 100, 10, 1.0) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[100] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_single_process_without_torchrun(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    d = init_distributed("cpu")
    assert (d.rank, d.world_size, d.is_main, d.enabled) == (0, 1, True, False)
    assert d.device == torch.device("cpu")


def test_grad_norm_matches_manual_sum():
    import math

    from mindhier.train.common import grad_norm

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model(torch.randn(5, 3)).pow(2).sum().backward()
    manual = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    assert grad_norm(model) == pytest.approx(manual, rel=1e-5)


def test_finite_guard_skips_then_stops():
    from mindhier.errors import MindhierError
    from mindhier.train.common import check_finite

    state = {}
    assert check_finite(torch.tensor(1.0), 0, 3, state)
    assert not check_finite(torch.tensor(float("nan")), 1, 3, state)
    assert not check_finite(torch.tensor(float("inf")), 2, 3, state)
    with pytest.raises(MindhierError, match="not finite for 3 steps"):
        check_finite(torch.tensor(float("nan")), 3, 3, state)
