"""Training curves: a log.jsonl becomes a PNG with the panels its fields call for, and every
training command's tiny run writes one log line per step (trimmed on --resume) and curves.png."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image

from mindhier.cli import main
from mindhier.curves import CurvesError, panels, write_curves

from test_train_generator import make_stack, train_args


def write_log(run: Path, records: list[dict], name: str = "log.jsonl") -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / name).write_text("".join(json.dumps(r) + "\n" for r in records))


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def drawn_panels(png: Path) -> list[str]:
    """The panel titles write_curves stores in the PNG."""
    return json.loads(Image.open(png).text["panels"])


# ---- the drawing ----------------------------------------------------------------------------


def test_log_becomes_a_png_with_its_panels(tmp_path):
    run = tmp_path / "run"
    write_log(run, [{"step": s, "loss": 5.0 / s, "shape_loss": 1.0 / s, "lr": 1e-3, "grad_norm": 2.0,
                     "accuracy": s / 100, "usage": {"used_overall": 0.5, "used_fraction": [0.1, 0.2]},
                     "seconds": 0.1, "epoch": 1} for s in range(1, 80)])
    write_log(run, [{"epoch": 1, "step": 40, "train": {"loss": 1.0}, "test": {"two_way": 0.7, "n_test": 20}},
                    {"epoch": 2, "step": 79, "train": {"loss": 0.5}, "test": {"two_way": 0.8, "n_test": 20}}],
              name="metrics.jsonl")
    png = write_curves(run)
    assert png == run / "curves.png" and Image.open(png).size[1] > Image.open(png).size[0]
    assert drawn_panels(png) == ["loss", "learning rate", "gradient norm", "training metrics", "held-out"]
    by_title = {p.title: p for p in panels(run)}
    assert set(by_title["loss"].lines) == {"loss", "shape_loss"}
    assert set(by_title["training metrics"].lines) == {"accuracy", "usage.used_overall"}  # no seconds, epoch, lists
    assert by_title["held-out"].lines == {"two_way": ([40, 79], [0.7, 0.8])}             # n_test is not a curve
    assert by_title["loss"].log_y and not by_title["gradient norm"].log_y                 # 5.0 .. 0.06 vs constant


def test_only_the_panels_the_log_has_and_skipped_steps_are_gaps(tmp_path):
    run = tmp_path / "run"
    write_log(run, [{"step": 1, "loss": 2.0, "lr": 1e-4}, {"step": 2, "lr": 1e-4, "skipped": True},
                    {"step": 3, "loss": float("nan"), "lr": 1e-4}, {"step": 4, "loss": 1.0, "lr": 1e-4}])
    assert drawn_panels(write_curves(run, tmp_path / "elsewhere" / "c.png")) == ["loss", "learning rate"]
    assert {p.title: p for p in panels(run)}["loss"].lines["loss"] == ([1, 4], [2.0, 1.0])


def test_damaged_logs_are_clear_errors_but_a_half_written_last_line_is_not(tmp_path):
    run = tmp_path / "run"
    write_log(run, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')                      # a run killed mid-write
    assert [p.title for p in panels(run)] == ["loss"]
    (run / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(CurvesError, match="line 2: not JSON"):
        panels(run)
    with pytest.raises(CurvesError, match="not found; give the --out folder"):
        panels(tmp_path / "nothing")


def test_curves_command(tmp_path, capsys):
    run = tmp_path / "run"
    write_log(run, [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in range(1, 5)])
    assert main(["curves", str(run)]) == 0
    assert (run / "curves.png").is_file() and "loss, learning rate" in capsys.readouterr().out
    assert main(["curves", str(tmp_path / "missing")]) == 2
    assert "log.jsonl: not found" in capsys.readouterr().err


def test_tensorboard_mirror_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from mindhier.train import common

    common.trim_log(tmp_path / "log.jsonl", 0)
    common.append_log(tmp_path, {"step": 1, "loss": 1.0, "usage": {"used_overall": 0.5}})
    common.plot_curves(tmp_path)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


# ---- every training command's tiny run --------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from mindhier.world.corpus import PRESETS as CORPUS
    from mindhier.world.corpus import write_corpus

    root = tmp_path_factory.mktemp("curves")
    s = make_stack(root)
    s["corpus"] = write_corpus(dataclasses.replace(CORPUS["tiny"], size=200), root / "corpus", workers=1,
                               show_progress=False)
    return s


def check_run(out: Path, steps: int, held_out: bool = False) -> None:
    assert [r["step"] for r in read_log(out)] == list(range(1, steps + 1))
    expected = ["loss", "learning rate", "gradient norm", "training metrics"] + ["held-out"] * held_out
    assert drawn_panels(out / "curves.png") == expected


def add_stale_line(out: Path, step: int) -> None:
    """A line written after the last checkpoint by a run that then died: --resume must drop it."""
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "loss": 99.0, "stale": True}) + "\n")


def encoder_args(stack, out, *extra):
    return ["train-encoder", "--data", str(stack["world"]), "--vision", str(stack["vision"]), "--out", str(out),
            "--preset", "tiny", "--sessions", "1", "--global-batch", "64", "--epochs", "2", "--precision", "fp32",
            "--target-cache", str(stack["root"] / "targets"), *extra]


def test_train_encoder_logs_every_step_and_resumes_its_log(stack):
    out = stack["root"] / "enc"
    assert main(encoder_args(stack, out, "--stop-after", "3")) == 0       # 2 steps per epoch: stops mid-epoch 2
    add_stale_line(out, 4)
    assert main(encoder_args(stack, out, "--resume")) == 0
    check_run(out, 4, held_out=True)
    assert not any(r.get("stale") for r in read_log(out))
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [2, 4]


def test_train_vision_logs_every_step_and_resumes_its_log(stack):
    out = stack["root"] / "vision_run"
    args = ["train-vision", "--data", str(stack["world"]), "--out", str(out), "--preset", "tiny", "--epochs", "2",
            "--global-batch", "64", "--device", "cpu", "--no-bf16"]
    assert main([*args, "--stop-after", "1"]) == 0                         # 200 training images: 3 steps/epoch
    add_stale_line(out, 4)
    assert main([*args, "--resume"]) == 0
    check_run(out, 6)
    assert not any(r.get("stale") for r in read_log(out))


def test_train_tokenizer_logs_every_step(stack):
    out = stack["root"] / "tok"
    assert main(["train-tokenizer", "--data", str(stack["world"]), "--preset", "tiny", "--out", str(out),
                 "--steps", "4", "--global-batch", "8", "--warmup", "1", "--log-every", "1", "--device", "cpu",
                 "--no-bf16"]) == 0
    check_run(out, 4)


def test_train_generator_logs_every_step(stack):
    out = stack["root"] / "gen"
    assert main(train_args(stack, out, steps=3)) == 0
    check_run(out, 3)


def test_pretrain_generator_logs_every_step(stack):
    out = stack["root"] / "pregen"
    assert main(["pretrain-generator", "--data", str(stack["corpus"]), "--vision", str(stack["vision"]),
                 "--tokenizer", str(stack["tokenizer"]), "--preset", "tiny", "--out", str(out), "--steps", "3",
                 "--global-batch", "8", "--warmup", "1", "--sample-every", "0", "--save-every", "0"]) == 0
    check_run(out, 3)


def test_train_reader_logs_every_step(stack):
    out = stack["root"] / "reader"
    assert main(["train-reader", "--data", str(stack["corpus"]), "--preset", "tiny", "--out", str(out),
                 "--steps", "4", "--batch", "16", "--save-every", "2", "--log-every", "1"]) == 0
    check_run(out, 4)
