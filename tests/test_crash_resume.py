"""Training that survives SIGKILL (issue 13).

A save killed at any instant leaves one complete checkpoint: the unit tests below crash
`save_checkpoint` in-process at each of its steps. Then every training command runs as a real
process and is SIGKILLed twice — inside a checkpoint save, then mid-training — and each
`--resume` must start at the last complete checkpoint and end with the loss curve and weights of
an uninterrupted run (same machine, same seed, fp32).

The kill inside a save is deterministic, whatever the machine's load: with
MINDHIER_TEST_HANG_IN_SAVE=N the process's N-th save stops right after its commit (the new
.json in place, the new weights still a temporary file: the one instant where the two final
files disagree), says so on stderr and waits; the test kills it there. N is 2 (an older
complete checkpoint beside the torn one) except for train-encoder and train-generator, which
are killed in their first save (no older weights at all: `--resume` must still find the
committed one). The kill mid-training is timed by polling the run's files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mindhier import checkpoint
from mindhier.checkpoint import HANG_ENV, CheckpointError, load_checkpoint, paths_for, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


# ---- save_checkpoint killed in-process at each of its steps ----------------------------------


class Killed(BaseException):
    """What SIGKILL leaves: the process stops where it is and no cleanup code runs."""


def crash_on_call(m: pytest.MonkeyPatch, owner, name: str, n: int) -> None:
    """Make the n-th call of owner.name raise Killed instead of running."""
    real, calls = getattr(owner, name), []

    def fake(*args, **kwargs):
        calls.append(name)
        if len(calls) == n:
            raise Killed(name)
        return real(*args, **kwargs)

    m.setattr(owner, name, fake)


def half_written(tensors, filename, metadata=None):
    """safetensors' save_file killed half way through the file."""
    save_file(tensors, filename, metadata=metadata)
    data = Path(filename).read_bytes()
    Path(filename).write_bytes(data[: len(data) // 2])
    raise Killed("save_file")


def save(path: Path, value: float) -> None:
    save_checkpoint(path, {"w": torch.full((4,), value)}, kind="toy", config={"width": 4}, extra={"step": value})


def kill_save(m: pytest.MonkeyPatch, point: str) -> None:
    """Arrange for the next save to be killed at ``point``."""
    if point == "writing the weights":
        m.setattr(checkpoint, "save_file", half_written)
    else:  # the 1st os.replace is the commit (.json), the 2nd moves the weights into place
        crash_on_call(m, os, "replace", {"before the commit": 1, "after the commit": 2}[point])


def loaded(path: Path) -> float:
    tensors, meta = load_checkpoint(path, kind="toy")
    assert float(tensors["w"][0]) == meta["step"], "weights and metadata of different saves"
    return meta["step"]


@pytest.mark.parametrize("point, survivor", [("writing the weights", 1.0), ("before the commit", 1.0),
                                             ("after the commit", 2.0)])
def test_a_save_killed_at_any_step_leaves_one_complete_checkpoint(tmp_path, monkeypatch, point, survivor):
    path = tmp_path / "model"
    save(path, 1.0)
    with monkeypatch.context() as m:
        kill_save(m, point)
        with pytest.raises(Killed):
            save(path, 2.0)
    assert loaded(path) == survivor
    save(path, 3.0)  # the next save overwrites whatever temporary files the killed one left
    assert loaded(path) == 3.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]


def commit_then_kill(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A complete save of 1.0, then a save of 2.0 killed right after its commit."""
    save(path, 1.0)
    with monkeypatch.context() as m:
        kill_save(m, "after the commit")
        with pytest.raises(Killed):
            save(path, 2.0)


def test_the_first_save_killed_after_its_commit_is_complete(tmp_path, monkeypatch):
    path = tmp_path / "model"
    with monkeypatch.context() as m:
        kill_save(m, "after the commit")
        with pytest.raises(Killed):
            save(path, 1.0)
    assert not paths_for(path)[0].exists()  # only the .json and the temporary weights
    assert loaded(path) == 1.0


def test_a_save_after_one_killed_past_its_commit_keeps_that_one(tmp_path, monkeypatch):
    """No load in between: the next save must first move the committed weights into place,
    else its own temporary file would overwrite them."""
    path = tmp_path / "model"
    commit_then_kill(path, monkeypatch)
    with monkeypatch.context() as m:
        kill_save(m, "writing the weights")
        with pytest.raises(Killed):
            save(path, 3.0)
    assert loaded(path) == 2.0


def test_a_committed_save_loads_where_it_cannot_be_finished(tmp_path, monkeypatch):
    """A read-only folder: the weights stay in the temporary file, and are read from there."""
    path = tmp_path / "model"
    commit_then_kill(path, monkeypatch)

    def refuse(*args):
        raise PermissionError("read-only file system")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", refuse)
        assert loaded(path) == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors", "model.safetensors.tmp"]


def test_weights_and_metadata_of_different_saves_are_refused(tmp_path):
    path = tmp_path / "model"
    weights, _ = paths_for(path)
    save(path, 1.0)
    first = weights.read_bytes()
    save(path, 2.0)
    weights.write_bytes(first)  # e.g. copied back by hand
    with pytest.raises(CheckpointError, match="come from different saves"):
        load_checkpoint(path)


def test_weights_copied_without_their_write_id_still_load(tmp_path):
    """Release copies (pretrain, demo release, pipeline folders) rewrite the weights with only
    their kind in the header and keep the JSON: they are not torn pairs."""
    path = tmp_path / "model"
    save(path, 1.0)
    weights, _ = paths_for(path)
    save_file(load_file(weights), str(weights), metadata={"kind": "toy"})
    assert loaded(path) == 1.0


@pytest.mark.slow
def test_train_generator_killed_while_writing_its_token_cache_starts_cleanly(inputs, tmp_path, monkeypatch):
    """The token cache is written under a temporary name: a killed write leaves no damaged
    OUT/tokens.safetensors for the next run to trip over."""
    import safetensors.torch

    from mindhier.cli import main

    argv = generator_argv(inputs)(tmp_path / "run")
    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", half_written)
        with pytest.raises(Killed):
            main(argv + ["--steps", "1"])
    assert not (tmp_path / "run" / "tokens.safetensors").exists()
    assert main(argv + ["--steps", "1"]) == 0


# ---- the training commands, SIGKILLed as real processes ------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """The existing tests' tiny inputs: the tiny world with random tiny vision, encoder and
    tokenizer checkpoints (test_train_generator), a 200-image corpus, and test_train_encoder's
    small data folder with its own random tiny vision model."""
    from mindhier.data import layout
    from mindhier.vision.small_clip import PRESETS as CLIP
    from mindhier.vision.small_clip import SmallClipModel, build_vocab, resolve_config, save_small_clip
    from mindhier.world.corpus import PRESETS as CORPUS
    from mindhier.world.corpus import write_corpus

    from test_train_encoder import make_data
    from test_train_generator import make_stack

    root = tmp_path_factory.mktemp("crash")
    found = make_stack(root)
    found["corpus"] = write_corpus(dataclasses.replace(CORPUS["tiny"], size=200), root / "corpus", workers=1,
                                   show_progress=False)
    found["encoder_data"] = make_data(root / "encoder_data")
    vocab = build_vocab(np.load(layout.captions_path(found["encoder_data"])).ravel().tolist())
    torch.manual_seed(0)
    save_small_clip(root / "encoder_vision" / "vision", SmallClipModel(resolve_config(CLIP["tiny"], vocab)), vocab)
    found["encoder_vision"] = root / "encoder_vision"
    return found


@dataclasses.dataclass
class Case:
    """How to run one training command and read where it is."""

    argv: Callable[[Path], list[str]]    # a fresh run into OUT
    checkpoint: str                      # the resumable checkpoint in OUT
    progress: Callable[[dict], int]      # how far its JSON says it is (steps, or epochs)
    every: int                           # a checkpoint every this many of those
    total: int
    curve: Callable[[Path, str], list]   # (step or epoch, loss, ...) rows from OUT and the printed output
    logged: Callable[[Path], int] | None = None  # last step in OUT/log.jsonl, where it has one per step
    hang: int = 2                        # the save to kill the first run in


def log_records(out: Path) -> list[dict]:
    """The complete lines of OUT/log.jsonl (a running command may be writing the last one)."""
    path = out / "log.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line) for line in lines if line]


def log_curve(out: Path, printed: str) -> list:
    return [(r["step"], r["loss"]) for r in log_records(out)]


def last_logged(out: Path) -> int:
    records = log_records(out)
    return records[-1]["step"] if records else 0


def generator_argv(inputs):
    return lambda out: ["train-generator", "--data", str(inputs["world"]), "--encoder", str(inputs["encoder"]),
                        "--tokenizer", str(inputs["tokenizer"]), "--preset", "tiny", "--out", str(out),
                        "--steps", "15", "--save-every", "3", "--global-batch", "8", "--lr", "3e-3",
                        "--warmup", "2", "--sample-every", "0", "--precision", "fp32"]


def encoder_curve(out: Path, printed: str) -> list:
    """Each epoch's training loss (the mean over its steps) and test scores."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["train"]["loss"], *(r["test"][k] for k in sorted(r["test"]))) for r in records]


def vision_curve(out: Path, printed: str) -> list:
    """The per-epoch losses the command printed, the last print of each epoch (an epoch whose
    checkpoint a kill prevented is redone and printed again)."""
    losses = {int(n): float(x) for n, x in re.findall(r"^epoch (\d+)/\d+: loss (\S+)", printed, re.M)}
    return sorted(losses.items())


def cases(inputs: dict) -> dict[str, Case]:
    step = lambda meta: meta["step"]  # noqa: E731
    progress_step = lambda meta: meta["progress"]["step"]  # noqa: E731
    return {
        "train-encoder": Case(
            lambda out: ["train-encoder", "--data", str(inputs["encoder_data"]), "--vision",
                         str(inputs["encoder_vision"]), "--out", str(out), "--preset", "tiny", "--global-batch", "16",
                         "--epochs", "2", "--lr", "3e-3", "--precision", "fp32", "--save-every", "2",
                         "--target-cache", str(out.parent / "targets")],
            "encoder", progress_step, every=2, total=12, curve=encoder_curve, hang=1),
        "train-generator": Case(generator_argv(inputs), "generator", progress_step, every=3, total=15,
                                curve=log_curve, logged=last_logged, hang=1),
        "train-tokenizer": Case(
            lambda out: ["train-tokenizer", "--data", str(inputs["world"]), "--preset", "tiny", "--out", str(out),
                         "--steps", "20", "--save-every", "4", "--global-batch", "8", "--lr", "2e-3", "--warmup", "2",
                         "--usage-window", "4", "--log-every", "1", "--device", "cpu", "--no-bf16"],
            "last", step, every=4, total=20, curve=log_curve, logged=last_logged),
        "train-vision": Case(
            lambda out: ["train-vision", "--data", str(inputs["world"]), "--out", str(out), "--preset", "tiny",
                         "--epochs", "8", "--global-batch", "16", "--lr", "3e-3", "--device", "cpu", "--no-bf16"],
            "vision", lambda meta: meta["epoch"], every=1, total=8, curve=vision_curve),
        "train-reader": Case(
            lambda out: ["train-reader", "--data", str(inputs["corpus"]), "--preset", "tiny", "--out", str(out),
                         "--steps", "100", "--save-every", "20", "--batch", "32", "--lr", "3e-3"],
            "last", step, every=20, total=100, curve=log_curve, logged=last_logged),
        "pretrain-generator": Case(
            lambda out: ["pretrain-generator", "--data", str(inputs["corpus"]), "--vision", str(inputs["vision"]),
                         "--tokenizer", str(inputs["tokenizer"]), "--preset", "tiny", "--out", str(out),
                         "--steps", "15", "--save-every", "3", "--global-batch", "8", "--lr", "3e-3",
                         "--warmup", "2", "--sample-every", "0", "--sample-images", "2", "--precision", "fp32"],
            "generator", progress_step, every=3, total=15, curve=log_curve, logged=last_logged),
    }


class Command:
    """One invocation of `python -m mindhier ...` with its output (stdout and stderr) in a file."""

    def __init__(self, argv: list[str], output: Path, hang_in_save: int = 0):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", HANG_ENV: str(hang_in_save)}
        self.output = output
        with open(output, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "mindhier", *argv], stdout=f, stderr=subprocess.STDOUT,
                                         env=env, cwd=REPO)

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the command ended (rc {self.proc.returncode}) before {what}:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"no {what} after {timeout} s:\n{self.text()[-3000:]}")
            time.sleep(0.02)

    def sigkill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait() == -signal.SIGKILL

    def finish(self, timeout: float = 600) -> None:
        rc = self.proc.wait(timeout)
        assert rc == 0, f"rc {rc}:\n{self.text()[-3000:]}"

    def resumed_at(self) -> int:
        """Where the command says it resumed: 'resumed ... at step N' (train-vision prints no such
        line: the first epoch it prints is the one after the checkpoint's)."""
        found = re.findall(r"resumed \S+ at step (\d+)", self.text())
        if not found:
            epochs = re.findall(r"^epoch (\d+)/\d+: loss", self.text(), re.M)
            return int(epochs[0]) - 1 if epochs else -1
        return int(found[0])


def saved(case: Case, out: Path) -> tuple[int, dict]:
    """(progress, metadata) of the checkpoint in OUT as its .json says (-1 before the first)."""
    path = paths_for(out / case.checkpoint)[1]
    if not path.exists():
        return -1, {}
    meta = json.loads(path.read_text())  # replaced by a rename: never seen half written
    return case.progress(meta), meta


def header_write_id(path: Path) -> str | None:
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("write_id")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train-encoder", "train-generator", "train-tokenizer", "train-vision",
                                     "train-reader", "pretrain-generator"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(inputs, tmp_path, command):
    case = cases(inputs)[command]
    reference, run = tmp_path / "reference", tmp_path / "run"
    Command(case.argv(reference), tmp_path / "reference.out").finish()

    # 1. SIGKILL inside a checkpoint save, between its commit and its weights' rename
    first = Command(case.argv(run), tmp_path / "1.out", hang_in_save=case.hang)
    first.wait_until(lambda: HANG_ENV in first.text(), f"checkpoint save {case.hang}")
    first.sigkill()
    committed, meta = saved(case, run)
    weights = paths_for(run / case.checkpoint)[0]
    assert committed == case.hang * case.every
    old = header_write_id(weights) if weights.exists() else None
    assert header_write_id(weights.with_name(weights.name + ".tmp")) == meta["write_id"] != old, \
        "the kill did not land between the commit and the weights' rename"

    # 2. resume it, then SIGKILL mid-training once a later checkpoint is saved
    second = Command(case.argv(run) + ["--resume"], tmp_path / "2.out")

    def past_a_later_checkpoint() -> bool:
        done = saved(case, run)[0]
        return done >= committed + case.every and (case.logged is None or case.logged(run) > done)

    second.wait_until(past_a_later_checkpoint, "later checkpoint")
    second.sigkill()
    assert second.resumed_at() == committed, "the resumed run did not start at the committed checkpoint"
    killed_at = saved(case, run)[0]
    assert committed < killed_at < case.total

    # 3. resume to the end
    third = Command(case.argv(run) + ["--resume"], tmp_path / "3.out")
    third.finish()
    assert third.resumed_at() == killed_at, "the resumed run did not start at the last checkpoint"

    printed = first.text() + second.text() + third.text()
    expected, got = case.curve(reference, (tmp_path / "reference.out").read_text()), case.curve(run, printed)
    assert [row[0] for row in got] == [row[0] for row in expected]
    np.testing.assert_allclose([row[1:] for row in got], [row[1:] for row in expected], rtol=1e-5, atol=0)
    a, b = load_file(paths_for(reference / case.checkpoint)[0]), load_file(weights)
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=0, msg=key)
