"""The world reader: its rates and intervals, the validity bar, and `train-reader` end to end
(learns, resumes exactly, reads the world's test stimuli, refuses to clobber a run)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from mindhier.cli import main
from mindhier.world import PRESETS as WORLD
from mindhier.world import generate_world
from mindhier.world import reader as R
from mindhier.world.corpus import PRESETS as CORPUS
from mindhier.world.corpus import write_corpus


def test_wilson_interval_known_values():
    r = R.rate_with_interval(np.array([1] * 5 + [0] * 5))
    assert r["rate"] == 0.5 and r["n"] == 10
    assert r["low"] == pytest.approx(0.2366, abs=1e-4) and r["high"] == pytest.approx(0.7634, abs=1e-4)
    zero = R.rate_with_interval(np.zeros(10))
    assert zero["low"] == 0.0 and zero["high"] == pytest.approx(0.2775, abs=1e-4)


def test_present_counts_only_the_whole_set_and_majority_guess():
    truth = {k: np.array([0, 1, 1]) for k in R.ATTRIBUTES if k != "present"}
    truth["present"] = np.array([[1, 0], [1, 1], [0, 1]])
    pred = {k: np.array([0, 1, 0]) for k in R.ATTRIBUTES if k != "present"}
    pred["present"] = np.array([[1, 0], [1, 0], [0, 1]])
    hit = R.hits(pred, truth)
    assert hit["main_category"].tolist() == [True, True, False]
    assert hit["present"].tolist() == [True, False, True]
    major = R.majority_rates(truth, truth)
    assert major["main_colour"]["rate"] == pytest.approx(2 / 3)
    assert major["present"]["rate"] == pytest.approx(1 / 3)  # [1, 1] is the per-category majority


def test_validity_bar():
    rates = {"main_category": {"rate": 0.95}, "main_cell": {"rate": 0.899}}
    assert R.validity(rates) == {"main_category": True, "main_cell": False}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    corpus = write_corpus(dataclasses.replace(CORPUS["tiny"], size=600), root / "corpus", workers=1,
                          show_progress=False)
    world = generate_world(WORLD["tiny"], root / "world", show_progress=False)
    return {"corpus": corpus, "world": world}


def reader_args(data, out, *extra, steps=60):
    return ["train-reader", "--data", str(data["corpus"]), "--preset", "tiny", "--out", str(out),
            "--steps", str(steps), "--batch", "32", "--lr", "3e-3", "--save-every", "20", *extra]


def test_reader_learns_and_reads_the_world_stimuli(data, tmp_path):
    out = tmp_path / "r"
    assert main(reader_args(data, out, "--world", str(data["world"]), steps=150)) == 0
    report = json.loads((out / "eval.json").read_text())
    stim = report["world_test_stimuli"]
    assert stim["main_category"]["n"] == WORLD["tiny"].n_test
    # background colour is the easiest attribute: far above the 1-in-12 chance after 150 steps
    assert report["corpus_held_out"]["main_category"]["n"] == 12  # every 50th of 600
    assert stim["background_colour"]["rate"] > 0.4
    assert set(report["valid"]) == set(R.ATTRIBUTES)
    reader, meta = R.load_reader(out / "reader")
    assert meta["step"] == 150 and "optim.state" not in " ".join(load_file(str(out / "reader.safetensors")))


def test_reader_resume_is_exact_and_starts_where_it_stopped(data, tmp_path, capsys):
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(reader_args(data, full)) == 0
    assert main(reader_args(data, split, "--stop-after", "40")) == 0
    capsys.readouterr()
    assert main(reader_args(data, split, "--resume")) == 0
    assert "at step 40" in capsys.readouterr().out
    a, b = load_file(str(full / "reader.safetensors")), load_file(str(split / "reader.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
    steps = [json.loads(line)["step"] for line in (split / "log.jsonl").read_text().splitlines()]
    assert steps == [25, 50]  # one log line per 25 steps, none repeated after the resume
    # and the resumed run depends on the saved state: perturbed saved weights change the result
    from safetensors.torch import save_file

    bent = tmp_path / "bent"
    assert main(reader_args(data, bent, "--stop-after", "40")) == 0
    tensors = load_file(str(bent / "last.safetensors"))
    key = next(k for k in tensors if k.startswith("heads.main_category.weight"))
    tensors[key] = tensors[key] + 0.5
    save_file(tensors, str(bent / "last.safetensors"))
    assert main(reader_args(data, bent, "--resume")) == 0
    assert not (load_file(str(bent / "reader.safetensors"))[key] == a[key]).all()


def test_reader_refuses_to_clobber_a_run(data, tmp_path, capsys):
    out = tmp_path / "once"
    assert main(reader_args(data, out, steps=2)) == 0
    assert main(reader_args(data, out, steps=2)) == 2
    assert "--resume" in capsys.readouterr().err


def test_attribute_table_marks_unreadable_attributes_everywhere(data, tmp_path):
    import torch

    from mindhier.data import ImageStore, SubjectIndex
    from mindhier.report import format_value
    from mindhier.world.corpus import world_labels
    from mindhier.world.generate import read_world_info

    out = tmp_path / "t"
    assert main(reader_args(data, out, steps=30)) == 0
    reader, _ = R.load_reader(out / "reader")
    world = data["world"]
    test = np.asarray(read_world_info(world)["test_images"])
    labels = world_labels(world)
    stimuli = torch.from_numpy(ImageStore(world).get(test))
    train = np.unique(SubjectIndex(world, 1).train.image)
    rows = {"grey pictures": torch.full_like(stimuli, 0.5), "the stimuli again": stimuli}
    table = R.attribute_table(reader, stimuli, {k: v[test] for k, v in labels.items()},
                              {k: v[train] for k, v in labels.items()}, rows)
    names = [name for name, _ in table]
    assert names == ["Stimuli themselves (reader ceiling)", "grey pictures", "the stimuli again",
                     "Majority class (constant guess)"]
    ceiling = table[0][1]
    assert table[2][1]["main_colour"]["rate"] == ceiling["main_colour"]["rate"]
    for _, row in table:
        for k, r in row.items():
            assert r["valid"] == (ceiling[k]["rate"] >= R.VALID_RATE)
            assert r["low"] <= r["rate"] <= r["high"]
    shown = format_value({"rate": 0.456, "low": 0.4, "high": 0.51, "valid": True}, "rate")
    assert shown == "46% [40–51]"
    hidden = format_value({"rate": 0.1, "low": 0.05, "high": 0.2, "valid": False, "ceiling": 0.83}, "rate")
    assert hidden == "not readable (reader 83% on stimuli)"  # the reader's ceiling, never the row's own rate
    assert all(r["ceiling"] == ceiling[k]["rate"] for _, row in table for k, r in row.items())


def test_demo_picks_the_reader_only_where_it_fits(tmp_path):
    from mindhier.demo import DEFAULT_READER, RECIPES, DemoError, world_reader

    assert world_reader("none", RECIPES["demo"]) is None
    with pytest.raises(DemoError, match="no checkpoint"):
        world_reader(str(tmp_path / "absent"), RECIPES["demo"])
    released = Path(__file__).resolve().parents[1] / DEFAULT_READER  # committed with the code
    assert world_reader(str(released), RECIPES["demo"]) == released
    with pytest.raises(DemoError, match="reads 64-px images"):  # the released reader reads 64-px worlds only
        world_reader(str(released), RECIPES["tiny"])


def test_released_reader_loads_and_records_its_corpus():
    released = Path(__file__).resolve().parents[1] / "checkpoints" / "foundation"
    reader, meta = R.load_reader(released / "reader")
    assert meta["released"]["corpus"] == {**meta["released"]["corpus"], "size": 100_000, "image_size": 64, "seed": 0}
    assert meta["step"] == meta["train"]["steps"]
    evaluation = json.loads((released / "reader_eval.json").read_text())
    assert evaluation["valid"] == R.validity(evaluation["world_test_stimuli"])
