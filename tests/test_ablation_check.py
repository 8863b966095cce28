"""`mindhier ablation-check` on a tiny stack: the method's images are the pipeline's own, each
ablation changes what the generator sees, and the verdicts follow from the recorded numbers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from mindhier.ablation_check import ABLATIONS, SEEDS, ablate_levels, draw, score, held_out_inputs, unrouted
from mindhier.checkpoint import paths_for, save_checkpoint
from mindhier.cli import main
from mindhier.pipeline import Pipeline
from mindhier.world import reader as R

from test_train_generator import make_stack, train_args


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A folder laid out as checkpoints/demo (encoder, tokenizer, generator) and a random reader."""
    root = tmp_path_factory.mktemp("ablation")
    stack = make_stack(root)
    assert main(train_args(stack, root / "gen", steps=4)) == 0
    folder = root / "released"
    folder.mkdir()
    for role, path in (("encoder", stack["encoder"]), ("tokenizer", stack["tokenizer"]),
                       ("generator", root / "gen" / "generator")):
        for src, dst in zip(paths_for(path), paths_for(folder / role)):
            shutil.copyfile(src, dst)
    torch.manual_seed(0)
    reader = R.WorldReader(R.PRESETS["tiny"])
    save_checkpoint(root / "reader" / "reader", reader.state_dict(), kind=R.KIND, config=reader.cfg)
    return stack["world"], folder, root / "reader" / "reader"


def test_ablated_hierarchies():
    levels = [torch.full((1, 2, 3), float(m)) for m in range(4)]
    assert [float(e[0, 0, 0]) for e in ablate_levels(levels, "reversed levels")] == [3, 2, 1, 0]
    assert [float(e[0, 0, 0]) for e in ablate_levels(levels, "last level only")] == [3, 3, 3, 3]
    assert ablate_levels(levels, "method") is levels


def test_method_is_the_pipelines_own_reconstruction_and_ablations_differ(released):
    world, folder, _ = released
    pipeline = Pipeline.from_checkpoints(folder / "encoder", folder / "tokenizer", folder / "generator",
                                         subject=1, device="cpu")
    voxels, ids, _ = held_out_inputs(world, 1, limit=4)
    method = draw(pipeline, pipeline.generator, voxels, ids, "method", cfg=3.0, seed=0)
    own = pipeline(voxels, cfg=3.0, seed=0, image_ids=ids).single_shot
    assert torch.equal(method, own.float().cpu())
    free = unrouted(pipeline.generator)
    assert free.cfg.routing == "none" and pipeline.generator.cfg.routing == "scale-aware"
    assert all(torch.equal(a, b) for a, b in zip(free.state_dict().values(), pipeline.generator.state_dict().values()))
    for variant in ABLATIONS:
        generator = free if variant == "no routing" else pipeline.generator
        ablated = draw(pipeline, generator, voxels, ids, variant, cfg=3.0, seed=0)
        assert ablated.shape == method.shape and not torch.equal(ablated, method), variant


def test_command_records_scores_spread_and_verdicts(released, tmp_path, capsys):
    world, folder, reader = released
    out = tmp_path / "check.json"
    assert main(["ablation-check", "--checkpoints", str(folder), "--world", str(world), "--reader", str(reader),
                 "--limit", "6", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "method (CFG 3.0, 6 images" in capsys.readouterr().out
    m = result["method"]
    assert len(m["seed_scores"]) == len(SEEDS) and np.isclose(m["score"], np.mean(m["seed_scores"]))
    assert m["seed_spread"] == max(m["seed_scores"]) - min(m["seed_scores"])
    assert len({s["images_sha256"] for s in m["by_seed"].values()}) == len(SEEDS)  # seeds draw other images
    for seed, s in m["by_seed"].items():
        assert score(s["rates"]) == m["seed_scores"][SEEDS.index(int(seed))]
    assert set(result["ablations"]) == set(ABLATIONS)
    for a in result["ablations"].values():
        assert a["score"] == score(a["rates"]) and a["separation"] == m["score"] - a["score"]
        assert a["separated"] == (a["separation"] > m["seed_spread"])
    before = out.read_text()
    assert main(["ablation-check", "--checkpoints", str(folder), "--world", str(world), "--reader", str(reader),
                 "--limit", "6", "--device", "cpu", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == before  # the record is kept
