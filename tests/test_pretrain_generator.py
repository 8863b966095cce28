"""`mindhier pretrain-generator` (the foundation generator, conditioned on each corpus image's
own vision hierarchy) and stage 2 starting from it (`train-generator --init`)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mindhier.checkpoint import load_checkpoint, save_checkpoint
from mindhier.cli import main
from mindhier.generator import GeneratorConfig, ScaleAwareGenerator
from mindhier.world.corpus import PRESETS as CORPUS
from mindhier.world.corpus import write_corpus

from test_train_generator import make_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    s = make_stack(root)
    # the stack's random encoder, recorded as train-encoder records it: aligned to the balanced layers
    from mindhier.generator.pretrained import vision_record
    from mindhier.vision import load_vision

    tensors, meta = load_checkpoint(s["encoder"], kind="encoder")
    meta["vision"].update(vision_record(load_vision(s["vision"]), [4, 5, 7, 8]))
    save_checkpoint(s["encoder"], tensors, kind="encoder", config=meta["config"],
                    extra={k: v for k, v in meta.items() if k not in ("kind", "config", "config_hash")})
    s["corpus"] = write_corpus(dataclasses.replace(CORPUS["tiny"], size=200), root / "corpus", workers=1,
                               show_progress=False)
    return s


def pretrain_args(stack, out, *extra, steps=6):
    return ["pretrain-generator", "--data", str(stack["corpus"]), "--vision", str(stack["vision"]),
            "--tokenizer", str(stack["tokenizer"]), "--preset", "tiny", "--out", str(out),
            "--steps", str(steps), "--global-batch", "8", "--lr", "3e-3", "--warmup", "2",
            "--sample-every", "0", "--save-every", "3", "--sample-images", "2", *extra]


def finetune_args(stack, out, init, *extra):
    return ["train-generator", "--data", str(stack["world"]), "--encoder", str(stack["encoder"]),
            "--tokenizer", str(stack["tokenizer"]), "--preset", "tiny", "--out", str(out), "--steps", "2",
            "--global-batch", "8", "--warmup", "1", "--sample-every", "0", "--save-every", "0",
            "--init", str(init), *extra]


@pytest.fixture(scope="module")
def pretrained(stack, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "pre"
    assert main(pretrain_args(stack, out)) == 0
    return out


def test_pretraining_records_its_condition_and_learns(pretrained, stack):
    _, meta = load_checkpoint(pretrained / "generator", kind="generator")
    assert meta["config"]["level_norm"] is True
    assert meta["pretrain"]["vision"]["layers"] == [4, 5, 7, 8]  # the balanced map on the 8-layer tiny CLIP
    assert "encoder" not in meta and meta["progress"]["step"] == 6
    log = [json.loads(line) for line in (pretrained / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    assert (pretrained / "samples" / "step_0000006.png").is_file()


def test_pretraining_resume_is_exact(stack, pretrained, tmp_path, capsys):
    split = tmp_path / "split"
    assert main(pretrain_args(stack, split, "--stop-after", "3")) == 0
    capsys.readouterr()
    assert main(pretrain_args(stack, split, "--resume")) == 0
    assert "at step 3/6" in capsys.readouterr().out
    a, b = load_file(str(pretrained / "generator.safetensors")), load_file(str(split / "generator.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("optim."))


def test_the_condition_is_the_images_own_vision_features(stack, pretrained):
    """The inputs of a step are the tokenizer's tokens of corpus images and their vision
    features at the recorded layers, zeroed for the dropped (CFG) samples."""
    import argparse

    from mindhier.train import pretrain_generator as P
    from mindhier.train.distributed import distributed_session

    parser = argparse.ArgumentParser()
    P.add_arguments(parser)
    args = parser.parse_args(pretrain_args(stack, pretrained, "--resume")[1:])
    args.subject, args.init_switti, args.init, args.tokens = 0, None, None, "on-the-fly"
    with distributed_session("cpu") as d:
        trainer = P.PretrainTrainer(args, d)
        rows = np.array([0, 1, 2])
        keep = torch.tensor([True, False, True])
        _, levels, targets = trainer._inputs(rows, keep)
        images = trainer._pictures(trainer.train_images[rows])
        feats = trainer.vision.image_layer_features(images, trainer.layers)
    assert len(levels) == 4
    assert torch.allclose(levels[2][0], feats[2][0]) and torch.count_nonzero(levels[2][1]) == 0
    assert targets.shape == (3, trainer.cfg.seq_len)


def test_level_norm_removes_the_scale_of_each_level():
    cfg = GeneratorConfig(level_norm=True)
    model = ScaleAwareGenerator(cfg)
    levels = [torch.randn(2, cfg.tokens_per_level, cfg.context_dim) for _ in range(cfg.num_levels)]
    scaled = [v * (m + 2.0) for m, v in enumerate(levels)]
    a, b = model.condition(levels), model.condition(scaled)
    assert torch.allclose(a.context, b.context, atol=1e-5) and torch.allclose(a.pooled, b.pooled, atol=1e-5)
    token_norm = a.context.view(2, cfg.num_levels, cfg.tokens_per_level, -1).norm(dim=-1).pow(2).mean(-1)
    assert torch.allclose(token_norm, torch.ones_like(token_norm), atol=1e-4)
    zeros = model.condition([torch.zeros_like(v) for v in levels])
    assert torch.count_nonzero(zeros.context) == 0
    off = ScaleAwareGenerator(GeneratorConfig()).condition(scaled)
    assert not torch.allclose(off.context, b.context)


def test_stage2_starts_from_the_pretrained_generator(stack, pretrained, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(finetune_args(stack, out, pretrained / "generator", "--lr", "0")) == 0  # lr 0: weights stay the init
    assert "starting from the pretrained generator" in capsys.readouterr().out
    start, pre = load_file(str(out / "generator.safetensors")), load_file(str(pretrained / "generator.safetensors"))
    assert all(torch.equal(start[k], pre[k]) for k in start if not k.startswith("optim."))
    _, meta = load_checkpoint(out / "generator", kind="generator")
    assert meta["init"] == str(pretrained / "generator") and meta["config"]["level_norm"] is True


def test_stage2_refuses_a_generator_pretrained_on_other_layers(stack, pretrained, tmp_path, capsys):
    tensors, meta = load_checkpoint(pretrained / "generator", kind="generator")
    meta["pretrain"]["vision"]["layers"] = [2, 4, 6, 8]
    other = tmp_path / "other" / "generator"
    save_checkpoint(other, tensors, kind="generator", config=meta["config"],
                    extra={k: v for k, v in meta.items() if k not in ("kind", "config", "config_hash")})
    assert main(finetune_args(stack, tmp_path / "ft2", other)) == 2
    err = capsys.readouterr().err
    assert "vision layers [2, 4, 6, 8]" in err and "pretrain-generator" in err


def test_pretraining_refuses_fmri_data(stack, tmp_path, capsys):
    args = pretrain_args(stack, tmp_path / "x")
    args[args.index("--data") + 1] = str(stack["world"])
    assert main(args) == 2
    assert "not a pretraining corpus" in capsys.readouterr().err


def test_warm_restart_starts_from_the_weights_and_records_the_rounds(stack, pretrained, tmp_path, capsys):
    out = tmp_path / "more"
    assert main(pretrain_args(stack, out, "--init", str(pretrained / "generator"), "--lr", "0", steps=2)) == 0
    assert "starting from the pretrained generator" in capsys.readouterr().out
    start, pre = load_file(str(out / "generator.safetensors")), load_file(str(pretrained / "generator.safetensors"))
    assert all(torch.equal(start[k], pre[k]) for k in start if not k.startswith("optim."))  # lr 0
    _, meta = load_checkpoint(out / "generator", kind="generator")
    (first,) = meta["pretrain"]["earlier_rounds"]
    assert first["from"] == str(pretrained / "generator") and first["steps"] == 6 and first["lr"] == 3e-3
    assert first["train_seconds"] > 0 and meta["progress"]["step"] == 2
    assert main(pretrain_args(stack, tmp_path / "third", "--init", str(out / "generator"), steps=1)) == 0
    _, meta3 = load_checkpoint(tmp_path / "third" / "generator", kind="generator")
    assert [r["steps"] for r in meta3["pretrain"]["earlier_rounds"]] == [6, 2]


def test_warm_restart_refuses_another_body_or_a_stage2_generator(stack, pretrained, tmp_path, capsys):
    args = pretrain_args(stack, tmp_path / "x", "--init", str(pretrained / "generator"), "--cond-drop", "0.3")
    assert main(args) == 2
    assert "its config differs" in capsys.readouterr().err
    stage2 = tmp_path / "ft"
    assert main(finetune_args(stack, stage2, pretrained / "generator")) == 0
    assert main(pretrain_args(stack, tmp_path / "y", "--init", str(stage2 / "generator"))) == 2
    assert "not a pretrain-generator checkpoint" in capsys.readouterr().err


def test_warm_restart_can_switch_cross_attention_rope_on_but_not_off(stack, pretrained, tmp_path, capsys):
    out = tmp_path / "rope"
    assert main(pretrain_args(stack, out, "--init", str(pretrained / "generator"), "--cross-rope", "--lr", "0",
                              steps=1)) == 0
    _, meta = load_checkpoint(out / "generator", kind="generator")
    assert meta["config"]["cross_rope"] is True
    start, pre = load_file(str(out / "generator.safetensors")), load_file(str(pretrained / "generator.safetensors"))
    assert all(torch.equal(start[k], pre[k]) for k in start if not k.startswith("optim."))  # no new weights
    capsys.readouterr()
    assert main(pretrain_args(stack, tmp_path / "off", "--init", str(out / "generator"), "--no-cross-rope")) == 2
    assert "its config differs" in capsys.readouterr().err
    stage2 = tmp_path / "ft"   # stage 2 keeps the body of the generator it starts from, cross_rope included
    assert main(finetune_args(stack, stage2, out / "generator")) == 0
    assert load_checkpoint(stage2 / "generator", kind="generator")[1]["config"]["cross_rope"] is True
