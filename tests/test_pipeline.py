"""`mindhier.Pipeline`: the same images as `mindhier reconstruct`, output shapes, checkpoints that
do not belong together refused, pipeline folders round-trip, and the README's snippet runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import mindhier
from mindhier.checkpoint import paths_for, save_checkpoint
from mindhier.cli import main as cli_main
from mindhier.encoder import VoxelCountError
from mindhier.pipeline import MismatchError, Pipeline, PipelineError
from test_train_generator import REPO, make_stack, train_args

RELEASED = REPO / "checkpoints" / "demo"
SAMPLING = dict(top_k=20, cfg=3.0, seed=7)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    stack = make_stack(tmp_path_factory.mktemp("pipeline"))
    out = stack["root"] / "gen"
    assert cli_main(train_args(stack, out, steps=4)) == 0
    return {**stack, "generator": out / "generator"}


@pytest.fixture(scope="module")
def pipe(trained):
    return Pipeline.from_checkpoints(encoder=trained["encoder"], tokenizer=trained["tokenizer"],
                                     generator=trained["generator"], vision=trained["vision"], device="cpu")


@pytest.fixture(scope="module")
def test_set(trained):
    return mindhier.load_test_set(trained["world"], subject=1, limit=5)


def test_same_seeds_give_the_images_of_the_command(trained, pipe, test_set):
    out_dir = trained["root"] / "cmd"
    assert cli_main(["reconstruct", "--data", str(trained["world"]), "--encoder", str(trained["encoder"]),
                     "--tokenizer", str(trained["tokenizer"]), "--generator", str(trained["generator"]),
                     "--vision", str(trained["vision"]), "--out", str(out_dir), "--limit", "5", "--batch", "3",
                     "--candidates", "2", "--top-k", "20", "--cfg", "3", "--seed", "7"]) == 0
    best = load_file(str(out_dir / "recons.safetensors"))
    single = load_file(str(out_dir / "recons_single-shot.safetensors"))
    chosen = json.loads((out_dir / "settings.json").read_text())["chosen"]

    out = pipe(test_set.voxels, image_ids=test_set.image_index, num_candidates=2, batch_size=2, **SAMPLING)
    assert out.label == "best-of-2" and out.image_ids == best["image_index"].tolist()
    assert torch.equal(out.images, best["recons"])            # another batch size, the same images
    assert torch.equal(out.single_shot, single["recons"])
    assert out.chosen.tolist() == [chosen[str(i)] for i in out.image_ids]
    assert out.scores.shape == (5, 2)


def test_output_shapes_scales_and_hierarchy(pipe, test_set):
    out = pipe(test_set.voxels[:3], image_ids=test_set.image_index[:3], return_scales=True,
               return_hierarchy=True, **SAMPLING)
    K, S = pipe.num_scales, pipe.image_size
    assert out.images.shape == (3, 3, S, S) and out.images.dtype == torch.float32
    assert 0 <= float(out.images.min()) and float(out.images.max()) <= 1
    assert torch.equal(out.images, out.single_shot) and out.label == "single-shot" and out.chosen is None
    assert out.scales.shape == (3, K, 3, S, S)
    assert torch.equal(out.scales[:, -1], out.images)          # the last scale's picture is the image
    M, T, D = pipe.encoder.cfg.num_levels, pipe.encoder.vision.num_tokens, pipe.encoder.vision.feature_dim
    assert [tuple(e.shape) for e in out.hierarchy] == [(3, T, D)] * M
    assert all(torch.equal(a, b) for a, b in zip(pipe.encode(test_set.voxels[:3]), out.hierarchy))
    assert [im.size for im in out.pil] == [(S, S)] * 3
    assert out.scales_strip(0).size[0] > out.scales_strip(0).size[1]   # K pictures side by side


def test_load_test_set_and_the_repeats_policy(trained, pipe, test_set):
    assert test_set.voxels.shape == (5, pipe.num_voxels) and test_set.stimuli.shape[:2] == (5, 3)
    assert test_set.image_index.tolist() == sorted(test_set.image_index.tolist()) and len(test_set[1:3]) == 2
    repeats = mindhier.load_test_set(trained["world"], subject=1, policy="repeats", limit=2)
    assert repeats.voxels.shape == (2, 3, pipe.num_voxels)
    assert torch.allclose(repeats.voxels.mean(1), test_set.voxels[:2], atol=1e-6)
    out = pipe(repeats.voxels, image_ids=repeats.image_index, **SAMPLING)   # outputs averaged (MindEye2)
    assert out.images.shape == (2, 3, pipe.image_size, pipe.image_size)


def test_bad_inputs_and_mismatched_checkpoints_are_refused(trained, pipe, test_set):
    other_tok = trained["root"] / "other_tokenizer" / "tokenizer"
    from mindhier.tokenizer import PRESETS, MultiScaleVQVAE

    save_checkpoint(other_tok, MultiScaleVQVAE(PRESETS["tiny"]).state_dict(), kind="tokenizer", config=PRESETS["tiny"])
    with pytest.raises(MismatchError, match="is not the tokenizer the generator"):
        Pipeline.from_checkpoints(trained["encoder"], other_tok, trained["generator"], device="cpu")
    with pytest.raises(MismatchError, match="subject 1, not subject 2"):
        Pipeline.from_checkpoints(trained["encoder"], trained["tokenizer"], trained["generator"], subject=2,
                                  device="cpu")
    with pytest.raises(VoxelCountError, match=r"encoder\.safetensors was trained on \d+ voxels"):
        pipe(test_set.voxels[:, :-1])
    with pytest.raises(PipelineError, match="voxels\\[None\\]"):
        pipe(test_set.voxels[0])
    with pytest.raises(PipelineError, match="image_ids"):
        pipe(test_set.voxels[:2], image_ids=[1])
    with pytest.raises(mindhier.MindhierError, match="tokenizer.json not found"):
        Pipeline.from_checkpoints(trained["encoder"], trained["root"] / "nowhere" / "tokenizer",
                                  trained["generator"], device="cpu")


def test_best_of_n_without_a_vision_model_says_what_to_pass(trained, tmp_path):
    meta = json.loads(paths_for(trained["encoder"])[1].read_text())
    meta["vision"]["path"] = str(tmp_path / "gone" / "vision")
    encoder = tmp_path / "encoder"
    (tmp_path / "encoder.safetensors").write_bytes(paths_for(trained["encoder"])[0].read_bytes())
    (tmp_path / "encoder.json").write_text(json.dumps(meta))
    lonely = Pipeline.from_checkpoints(encoder, trained["tokenizer"], trained["generator"], device="cpu")
    assert lonely.vision is None
    voxels = mindhier.load_test_set(trained["world"], subject=1, limit=2).voxels
    with pytest.raises(PipelineError, match="pass vision=PATH"):
        lonely(voxels, num_candidates=2)


def test_save_pretrained_round_trip(trained, pipe, test_set, tmp_path):
    folder = pipe.save_pretrained(tmp_path / "set")
    manifest = json.loads((folder / "pipeline.json").read_text())
    assert manifest["files"] == {r: r for r in ("encoder", "tokenizer", "generator", "vision")}
    assert manifest["subject"] == 1 and manifest["num_voxels"] == pipe.num_voxels
    assert not any(k.startswith("optim.") for k in load_file(str(folder / "generator.safetensors")))
    for role in ("encoder", "tokenizer", "generator", "vision"):  # metadata byte for byte: identities still match
        assert (folder / f"{role}.json").read_bytes() == paths_for(trained[role])[1].read_bytes()

    again = Pipeline.from_pretrained(folder, device="cpu")
    kwargs = dict(image_ids=test_set.image_index[:2], num_candidates=2, **SAMPLING)
    assert torch.equal(again(test_set.voxels[:2], **kwargs).images, pipe(test_set.voxels[:2], **kwargs).images)

    with pytest.raises(PipelineError, match="overwrite=True"):
        pipe.save_pretrained(folder)
    pipe.save_pretrained(folder, overwrite=True)
    (folder / "pipeline.json").unlink()                        # standard names suffice
    assert Pipeline.from_pretrained(folder, device="cpu").num_voxels == pipe.num_voxels
    (folder / "generator.safetensors").unlink()
    with pytest.raises(PipelineError, match=r"missing generator \(generator\.safetensors \+ generator\.json\)"):
        Pipeline.from_pretrained(folder, device="cpu")


def test_a_manifest_that_no_longer_fits_is_refused(pipe, tmp_path):
    folder = pipe.save_pretrained(tmp_path / "set")
    manifest = json.loads((folder / "pipeline.json").read_text())
    manifest["num_voxels"] += 1
    (folder / "pipeline.json").write_text(json.dumps(manifest))
    with pytest.raises(PipelineError, match="num_voxels: manifest"):
        Pipeline.from_pretrained(folder, device="cpu")
    manifest["files"]["encoder"] = "../encoder"
    (folder / "pipeline.json").write_text(json.dumps(manifest))
    with pytest.raises(PipelineError, match="not a plain name"):
        Pipeline.from_pretrained(folder, device="cpu")


@pytest.mark.skipif(not (RELEASED / "generator.json").is_file(), reason=f"no released checkpoints in {RELEASED}")
def test_the_released_folder_loads_without_a_manifest():
    before = sorted(p.name for p in RELEASED.iterdir())
    released = Pipeline.from_pretrained(RELEASED, device="cpu")
    assert released.subject == 1 and released.num_voxels == 2516 and "vision" in released.checkpoints
    assert (released.image_size, released.num_scales) == (64, 6)
    assert sorted(p.name for p in RELEASED.iterdir()) == before   # loading writes nothing there


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_snippet_runs(trained, pipe, tmp_path, monkeypatch, capsys):
    """The README's code, as written, with the demo's paths pointing at the tiny world and set."""
    code = readme_snippet()
    assert "checkpoints/demo" in code and "worlds/demo" in code and len(code.strip().splitlines()) <= 12
    folder = pipe.save_pretrained(tmp_path / "tiny_set")
    code = code.replace('"checkpoints/demo"', repr(str(folder))).replace('"worlds/demo"', repr(str(trained["world"])))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert f"torch.Size([8, 3, {pipe.image_size}, {pipe.image_size}])" in printed
    assert "'pixcorr':" in printed and "'clip_ours':" in printed and (tmp_path / "recon.png").is_file()


def test_import_stays_light_and_names_are_lazy():
    code = "import sys, mindhier; assert 'torch' not in sys.modules, 'import mindhier pulled in torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    assert mindhier.Pipeline is Pipeline and callable(mindhier.evaluate_images)
    assert {"Pipeline", "load_test_set", "evaluate_images"} <= set(dir(mindhier))
    with pytest.raises(AttributeError):
        mindhier.no_such_name
