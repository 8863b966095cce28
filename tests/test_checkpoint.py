"""Self-describing checkpoints: round trip, config checks, strict keys, optimizer state."""

import dataclasses
import json

import pytest
import torch

from mindhier.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_state_strict,
    optimizer_from_tensors,
    optimizer_to_tensors,
    paths_for,
    save_checkpoint,
)
from mindhier.config import ConfigError, config_hash, from_dict, get_preset, to_dict


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    width: int = 4
    scales: tuple = (1, 2, 3)
    name: str = "toy"


def test_config_round_trip_restores_tuples_and_hash():
    cfg = ToyConfig(width=8)
    back = from_dict(ToyConfig, json.loads(json.dumps(to_dict(cfg))))
    assert back == cfg and isinstance(back.scales, tuple)
    assert config_hash(back) == config_hash(cfg) != config_hash(ToyConfig())


def test_config_rejects_unknown_keys_and_unknown_presets():
    with pytest.raises(ConfigError, match="unknown config keys"):
        from_dict(ToyConfig, {"width": 2, "depth": 3})
    with pytest.raises(ConfigError, match="choose one of"):
        get_preset({"tiny": ToyConfig()}, "huge")


def test_save_load_round_trip_with_metadata(tmp_path):
    tensors = {"w": torch.randn(3, 4), "b": torch.arange(5)}
    save_checkpoint(tmp_path / "m", tensors, kind="toy", config=ToyConfig(), extra={"step": 7})
    weights, meta_path = paths_for(tmp_path / "m")
    assert weights.exists() and meta_path.exists()
    loaded, meta = load_checkpoint(tmp_path / "m.safetensors", kind="toy", config=ToyConfig())
    assert torch.equal(loaded["w"], tensors["w"]) and torch.equal(loaded["b"], tensors["b"])
    assert meta["step"] == 7 and meta["config"]["width"] == 4 and meta["git_commit"]
    assert meta["config_hash"] == config_hash(ToyConfig())


def test_wrong_kind_and_wrong_config_are_named(tmp_path):
    save_checkpoint(tmp_path / "m", {"w": torch.zeros(1)}, kind="toy", config=ToyConfig())
    with pytest.raises(CheckpointError, match="'toy' checkpoint"):
        load_checkpoint(tmp_path / "m", kind="encoder")
    with pytest.raises(ConfigError, match="width: expected 9, checkpoint has 4"):
        load_checkpoint(tmp_path / "m", config=ToyConfig(width=9))


def test_missing_and_damaged_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent")
    save_checkpoint(tmp_path / "m", {"w": torch.zeros(10)}, kind="toy", config=ToyConfig())
    weights, _ = paths_for(tmp_path / "m")
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_checkpoint(tmp_path / "m")


def test_load_state_strict_names_offending_keys():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match="missing keys: bias"):
        load_state_strict(model, {"weight": torch.zeros(2, 3)}, "x.safetensors")
    with pytest.raises(CheckpointError, match=r"weight \(2, 4\) vs model \(2, 3\)"):
        load_state_strict(model, {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, "x")
    load_state_strict(model, {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}, "x")
    assert torch.equal(model.weight, torch.ones(2, 3))


def test_optimizer_state_round_trip_continues_identically():
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 1)
    b = torch.nn.Linear(4, 1)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.AdamW(a.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    for _ in range(3):
        opt_a.zero_grad()
        a(x).pow(2).mean().backward()
        opt_a.step()
    b.load_state_dict(a.state_dict())
    opt_b = torch.optim.AdamW(b.parameters(), lr=0.1)
    tensors, info = optimizer_to_tensors(opt_a)
    optimizer_from_tensors(opt_b, tensors, json.loads(json.dumps(info)))
    for model, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    assert torch.equal(a.weight, b.weight)
