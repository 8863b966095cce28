"""`mindhier pretrain`: every foundation stage on the tiny corpus, released with model cards,
reused when run again, resumed after an interruption, and refusing a stage without its inputs."""

from __future__ import annotations

import json

from mindhier.checkpoint import read_metadata
from mindhier.cli import main


def argv(tmp, *extra):
    return ["pretrain", "--recipe", "tiny", "--corpus", str(tmp / "corpus"), "--world", str(tmp / "world"),
            "--out", str(tmp / "runs"), "--checkpoints", str(tmp / "released"), *extra]


def test_pretrain_all_stages_release_and_reuse(tmp_path, capsys):
    assert main(argv(tmp_path, "--release")) == 0
    released = tmp_path / "released"
    for stage in ("reader", "vision", "tokenizer", "generator"):
        meta = read_metadata(released / stage)
        assert meta["released"]["dtype"] == ("float32" if stage == "reader" else "bfloat16")
        assert meta["released"]["corpus"]["size"] == 600
        card = (released / f"{stage}.md").read_text()
        assert "corpus: 600 images of 32 px, seed 0" in card and "training time:" in card
        weights, meta_file = released / f"{stage}.safetensors", released / f"{stage}.json"
        assert weights.stat().st_mode & 0o777 == meta_file.stat().st_mode & 0o777  # both follow the umask
    assert "world_test_stimuli" in json.loads((released / "reader_eval.json").read_text())
    probe = json.loads((released / "vision_probe.json").read_text())  # probe-vision ran on every layer
    assert set(probe["rates"]) >= {"layer 1", "embedding", "majority guess"}
    assert "What each layer carries" in (released / "vision.md").read_text()
    gen = read_metadata(released / "generator")
    # released, the generator is conditioned on the released (bf16) vision model the encoder will use
    assert gen["pretrain"]["vision_path"] == str(released / "vision")
    assert gen["tokenizer_path"] == str(released / "tokenizer")
    # the recipe's second generator round started from the first and is the one released
    assert gen["released"]["from"] == str(tmp_path / "runs" / "generator-r2" / "generator")
    (first,) = gen["pretrain"]["earlier_rounds"]
    assert first["from"] == str(tmp_path / "runs" / "generator" / "generator") and first["steps"] == 6
    assert gen["progress"]["step"] == 2 and gen["released"]["train_seconds"] > first["train_seconds"]
    assert "trained in 2 rounds, 8 steps in all" in (released / "generator.md").read_text()
    capsys.readouterr()
    assert main(argv(tmp_path, "--release")) == 0  # the same command again: nothing retrained
    out = capsys.readouterr().out
    assert out.count("reusing") == 7, out  # the corpus, the world, the four stages and the second round


def test_interrupted_stage_resumes_and_missing_inputs_are_refused(tmp_path, capsys):
    # the reader stops halfway (as a killed job would leave it); the next run resumes it
    assert main(["corpus", "--preset", "tiny", "--out", str(tmp_path / "corpus"), "--quiet", "--workers", "1"]) == 0
    assert main(["world", "--preset", "tiny", "--out", str(tmp_path / "world"), "--quiet"]) == 0
    half = ["train-reader", "--data", str(tmp_path / "corpus"), "--world", str(tmp_path / "world"),
            "--out", str(tmp_path / "runs" / "reader"), "--preset", "tiny", "--steps", "20", "--batch", "32",
            "--save-every", "10", "--stop-after", "10"]
    assert main(half) == 0
    capsys.readouterr()
    assert main(argv(tmp_path, "--stages", "reader")) == 0
    assert "resumed" in capsys.readouterr().out
    assert main(argv(tmp_path, "--stages", "generator")) == 2
    assert "needs the finished vision, tokenizer" in capsys.readouterr().err
