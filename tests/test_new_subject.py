"""The new-subject recipe of docs/new_subject.md, end to end on the tiny world with tiny presets.
Stages 1 and 2 train on subject 1. Subject 2 then starts from them and trains on its session 1
alone (Table S2's amount of data), and is reconstructed from its whole test set. Each step
records what it started from and which sessions it saw. The commands in the doc parse."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mindhier.cli import COMMANDS
from mindhier.cli import main as cli_main

from test_train_generator import REPO, make_stack, train_args

DOC = REPO / "docs" / "new_subject.md"


def encoder_args(stack: dict, out: Path, subject: int, *extra: str) -> list[str]:
    return ["train-encoder", "--data", str(stack["world"]), "--subject", str(subject), "--vision", str(stack["vision"]),
            "--out", str(out), "--preset", "tiny", "--epochs", "1", "--global-batch", "32", "--precision", "fp32",
            "--target-cache", str(stack["root"] / "targets"), *extra]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    return make_stack(tmp_path_factory.mktemp("new_subject"))


def test_a_new_subject_from_another_subject_on_one_session(stack, capsys):
    root = stack["root"]
    # 1. the source subject, every session
    assert cli_main(encoder_args(stack, root / "s1_enc", 1)) == 0
    source = {**stack, "encoder": root / "s1_enc" / "encoder"}
    assert cli_main(train_args(source, root / "s1_gen", steps=2)) == 0
    # 2. subject 2 from them, on its session 1
    capsys.readouterr()
    assert cli_main(encoder_args(stack, root / "s2_enc", 2, "--sessions", "1", "--init", str(source["encoder"]))) == 0
    assert "re-initialised: mlp.0.weight, mlp.0.bias" in capsys.readouterr().out
    enc = json.loads((root / "s2_enc" / "encoder.json").read_text())
    assert enc["subject"] == 2 and enc["nsd_sessions"] == [1] and enc["train"]["init"] == str(source["encoder"])
    assert enc["init"]["subject"] == 1 and enc["init"]["reinitialised"] == ["mlp.0.weight", "mlp.0.bias"]
    new = {**stack, "encoder": root / "s2_enc" / "encoder"}
    assert cli_main(train_args(new, root / "s2_all", "--subject", "2", steps=1)) == 2   # stage 2 on other sessions
    assert "both stages must see the same sessions: pass --sessions 1" in capsys.readouterr().err
    assert cli_main(train_args(new, root / "s2_gen", "--subject", "2", "--sessions", "1",
                               "--init", str(root / "s1_gen" / "generator"), steps=2)) == 0
    gen = json.loads((root / "s2_gen" / "generator.json").read_text())
    assert gen["subject"] == 2 and gen["nsd_sessions"] == [1] and gen["init"] == str(root / "s1_gen" / "generator")
    # 3. the new subject's test set
    out = root / "s2_recon"
    assert cli_main(["reconstruct", "--data", str(stack["world"]), "--subject", "2", "--encoder", str(new["encoder"]),
                     "--tokenizer", str(stack["tokenizer"]), "--generator", str(root / "s2_gen" / "generator"),
                     "--out", str(out), "--candidates", "1", "--top-k", "20", "--batch", "20"]) == 0
    recons = load_file(str(out / "recons.safetensors"))
    assert recons["recons"].shape == (20, 3, 32, 32) and torch.isfinite(recons["recons"]).all()
    assert json.loads((out / "settings.json").read_text())["subject"] == 2


def doc_commands() -> list[list[str]]:
    """Every `mindhier ...` command in the doc's code blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [shlex.split(line.strip())[1:] for line in text.splitlines() if line.strip().startswith("mindhier ")]


def test_the_documented_commands_parse():
    commands = doc_commands()
    assert {c[0] for c in commands} == {"world", "train-encoder", "train-generator", "reconstruct", "evaluate"}
    assert sum("--sessions" in c for c in commands) == 4 and sum("--init" in c for c in commands) == 4
    for argv in commands:
        parser = argparse.ArgumentParser(prog=f"mindhier {argv[0]}", exit_on_error=False)
        importlib.import_module(COMMANDS[argv[0]][0]).add_arguments(parser)
        parser.parse_args(argv[1:])   # an unknown flag or value raises
