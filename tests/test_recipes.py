"""Named training recipes (mindhier.train.recipes): the paper's schedule as one flag, every value
with its source, and explicit flags winning over the recipe."""

import argparse
import re
from pathlib import Path

import pytest

from mindhier.train import recipes

PAPER_TEXT = Path(__file__).resolve().parents[2] / "shared" / "paper" / "mindhier_paper.txt"


def parser_for(stage: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    for key in recipes.STAGES[stage]["paper"]:
        kind = str if key == "crop" else float
        p.add_argument(recipes.flag(key), type=kind, default=None, help=recipes.recipe_help(stage, key, key))
    recipes.add_recipe_argument(p, stage)
    return p


@pytest.mark.parametrize("stage", sorted(recipes.STAGES))
def test_every_recipe_sets_the_same_flags_and_names_its_sources(stage):
    keys = {name: set(values) for name, values in recipes.STAGES[stage].items()}
    assert keys["paper"] == keys["demo"]
    for values in recipes.STAGES[stage].values():
        assert all(v.source for v in values.values())


def test_the_recipe_fills_what_the_command_line_left_out_and_records_where_each_came_from():
    args = parser_for("encoder").parse_args(["--recipe", "paper", "--epochs", "20"])
    sources = recipes.resolve(args, "encoder")
    assert args.epochs == 20 and sources["epochs"] == "command line"  # explicit wins, even the demo's value
    assert args.global_batch == 512 and args.lr == 1e-4 and args.warmup == pytest.approx(2 / 300)
    assert sources["global_batch"].startswith("recipe paper: paper App. E")
    assert sources["weight_decay"].startswith("recipe paper: official")


def test_the_default_recipe_is_the_demo_schedule():
    args = parser_for("generator").parse_args([])
    recipes.resolve(args, "generator")
    assert (args.steps, args.global_batch, args.weight_decay, args.crop) == (2000, 32, 0.05, "none")
    paper = parser_for("generator").parse_args(["--recipe", "paper"])
    recipes.resolve(paper, "generator")
    assert (paper.steps, paper.global_batch, paper.weight_decay, paper.crop) == (9000, 80, 0.0, "resize-crop")


def test_an_unknown_recipe_is_refused():
    with pytest.raises(SystemExit):
        parser_for("encoder").parse_args(["--recipe", "official"])


@pytest.mark.skipif(not PAPER_TEXT.is_file(), reason=f"needs the paper's text at {PAPER_TEXT}")
def test_the_paper_recipe_says_what_appendix_e_says():
    text = " ".join(PAPER_TEXT.read_text().split())
    stage1 = re.search(r"mini-batch size of (\d+).*?initialized to 1×10\^\{-4\}.*?total of (\d+) epochs", text)
    stage2 = re.search(r"learning rate with 1×10\^\{-4\}.*?mini-batch size of (\d+) and train for \$(\d+)K\$", text)
    assert stage1 and stage2
    encoder, generator = recipes.ENCODER["paper"], recipes.GENERATOR["paper"]
    assert (encoder["global_batch"].value, encoder["epochs"].value) == (int(stage1[1]), int(stage1[2]))
    assert (generator["global_batch"].value, generator["steps"].value) == (int(stage2[1]), int(stage2[2]) * 1000)
    assert encoder["lr"].value == generator["lr"].value == 1e-4
