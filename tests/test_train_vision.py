"""`mindhier train-vision` on a generated mini data set: the loss falls, retrieval beats chance,
checkpoints resume and refuse the wrong config, and outputs are never overwritten silently."""

import argparse
import json

import h5py
import numpy as np
import pytest
import torch

from mindhier.checkpoint import read_metadata
from mindhier.config import ConfigError
from mindhier.errors import MindhierError
from mindhier.train import vision as train_vision
from mindhier.train.distributed import Dist
from mindhier.vision import SmallClip, load_vision

COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.1, 0.2, 1.0), "yellow": (1.0, 0.9, 0.1)}
PLACES = {"top left": (0, 0), "top right": (0, 16), "bottom left": (16, 0), "bottom right": (16, 16)}


@pytest.fixture(scope="module")
def pairs_root(tmp_path_factory):
    """64 images of 32 px: a coloured square in one quadrant, 5 paraphrased captions each,
    8 of them held out as test images (world/world.json 'test_images', as `mindhier world` writes)."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    images, captions = [], []
    for i in range(64):
        colour, place = list(COLOURS)[i % 4], list(PLACES)[(i // 4) % 4]
        img = np.full((3, 32, 32), 0.3, dtype=np.float32) + rng.normal(0, 0.03, (3, 32, 32))
        y, x = PLACES[place]
        img[:, y + 2: y + 14, x + 2: x + 14] = np.array(COLOURS[colour])[:, None, None]
        images.append(img.clip(0, 1))
        captions.append([f"a {colour} square in the {place}", f"{place}: a {colour} square",
                         f"the square in the {place} is {colour}", f"a {colour} block at the {place}", ""])
    with h5py.File(root / "coco_images_224_float16.hdf5", "w") as f:
        f.create_dataset("images", data=np.stack(images).astype(np.float16))
    np.save(root / "COCO_73k_annots_curated.npy", np.array(captions))
    (root / "world").mkdir()
    (root / "world" / "world.json").write_text(json.dumps({"test_images": list(range(56, 64))}))
    return root


def args_for(root, out, **kw):
    parser = argparse.ArgumentParser()
    train_vision.add_arguments(parser)
    argv = ["--data", str(root), "--out", str(out), "--preset", "tiny", "--epochs", "12",
            "--global-batch", "16", "--lr", "3e-3", "--device", "cpu"]
    for key, value in kw.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return parser.parse_args(argv)


def losses_from(capsys) -> list[float]:
    return [float(line.split("loss ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()
            if line.startswith("epoch ")]


def test_train_vision_learns_and_writes_checkpoint_and_eval(pairs_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_vision.train(args_for(pairs_root, out), Dist(0, 1, 0, torch.device("cpu"))) == 0
    losses = losses_from(capsys)
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0]
    report = json.loads((out / "eval.json").read_text())
    assert report["test"]["n"] == 8 and report["test"]["chance"] == pytest.approx(1 / 8)
    assert report["train_subset"]["image_to_caption_top1"] > 2 * report["train_subset"]["chance"]
    meta = read_metadata(out / "vision")
    assert meta["kind"] == "vision" and meta["epoch"] == 12 and "<unk>" in meta["vocab"]
    assert "coco_images_224_float16.hdf5" in meta["data_manifest"]["files"]
    clip = load_vision(out)
    assert isinstance(clip, SmallClip) and clip.num_layers == 8
    assert tuple(clip.image_layer_features(torch.rand(1, 3, 32, 32), clip.default_layers)[0].shape) == (1, 17, 32)
    with pytest.raises(MindhierError, match="--resume to continue it or --force"):
        train_vision.train(args_for(pairs_root, out), Dist(0, 1, 0, torch.device("cpu")))


def test_resumed_run_matches_uninterrupted_run(pairs_root, tmp_path, capsys):
    cpu = Dist(0, 1, 0, torch.device("cpu"))
    train_vision.train(args_for(pairs_root, tmp_path / "full", epochs=4, no_bf16=True), cpu)
    full = losses_from(capsys)
    # Interrupted after 2 of 4 epochs, then resumed from its checkpoint.
    train_vision.train(args_for(pairs_root, tmp_path / "part", epochs=4, stop_after=2, no_bf16=True), cpu)
    assert not (tmp_path / "part" / "eval.json").exists()
    capsys.readouterr()
    train_vision.train(args_for(pairs_root, tmp_path / "part", epochs=4, no_bf16=True, resume=True), cpu)
    resumed = losses_from(capsys)
    assert resumed == pytest.approx(full[2:], rel=1e-4)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    a, b = load_vision(tmp_path / "full"), load_vision(tmp_path / "part")
    assert torch.allclose(a.image_embedding(images), b.image_embedding(images), atol=1e-5)


def test_resume_into_another_preset_names_the_fields(pairs_root, tmp_path):
    cpu = Dist(0, 1, 0, torch.device("cpu"))
    train_vision.train(args_for(pairs_root, tmp_path / "r", epochs=1), cpu)
    with pytest.raises(ConfigError, match="width: expected 128, checkpoint has 32"):
        train_vision.train(args_for(pairs_root, tmp_path / "r", epochs=2, resume=True, preset="demo"), cpu)
    with pytest.raises(MindhierError, match="no checkpoint"):
        train_vision.train(args_for(pairs_root, tmp_path / "none", resume=True), cpu)


@pytest.mark.slow
def test_two_process_run_matches_one_process(pairs_root, tmp_path, capsys):
    """torchrun with 2 gloo processes: the global batch is the same batch (features gathered,
    augmentation drawn for the whole batch), so losses and weights match a 1-process run."""
    import os
    import subprocess
    import sys

    train_vision.train(args_for(pairs_root, tmp_path / "one", epochs=2, no_bf16=True),
                       Dist(0, 1, 0, torch.device("cpu")))
    one = losses_from(capsys)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mindhier",
           "train-vision", "--data", str(pairs_root), "--out", str(tmp_path / "two"), "--preset", "tiny",
           "--epochs", "2", "--global-batch", "16", "--lr", "3e-3", "--device", "cpu", "--no-bf16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    two = [float(line.split("loss ")[1].split()[0]) for line in done.stdout.splitlines() if line.startswith("epoch ")]
    assert "2 process(es)" in done.stdout and two == pytest.approx(one, rel=1e-4)
    a, b = load_vision(tmp_path / "one"), load_vision(tmp_path / "two")
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.allclose(p, q, atol=2e-3), name


def test_swap_first_word_edits_only_the_first_listed_word_and_marks_rows_without_one():
    words = torch.tensor([10, 11, 12])
    ids = torch.tensor([[1, 11, 5, 12, 0], [1, 5, 6, 7, 0], [1, 10, 10, 3, 0]])
    for u in (0.0, 0.49, 0.99):
        edited, has = train_vision.swap_first_word(ids, words, torch.full((3,), u))
        assert has.tolist() == [True, False, True]
        assert torch.equal(edited[1], ids[1])
        for row, pos in ((0, 1), (2, 1)):
            assert edited[row, pos] in words and edited[row, pos] != ids[row, pos]
            rest = [i for i in range(5) if i != pos]
            assert torch.equal(edited[row, rest], ids[row, rest])
    picks = {int(train_vision.swap_first_word(ids, words, torch.full((3,), u))[0][0, 1]) for u in (0.0, 0.99)}
    assert picks == {10, 12}  # both other words are reachable


def test_hard_negatives_enter_the_image_side_only_and_rows_without_one_drop_out():
    g = torch.Generator().manual_seed(0)
    image, text = (torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1) for _ in range(2))
    scale, d = torch.tensor(10.0), Dist(0, 1, 0, torch.device("cpu"))
    plain = train_vision.contrastive_loss(image, text, scale, d)
    none_kept = train_vision.contrastive_loss(image, text, scale, d, text.clone(), torch.zeros(4, dtype=torch.bool))
    assert torch.allclose(plain, none_kept)
    # a negative as close as the true caption: the image side's loss rises by ~log 2 / 2 per row
    hard = train_vision.contrastive_loss(image, text, scale, d, text.clone(), torch.ones(4, dtype=torch.bool))
    assert hard > plain + 0.1


def test_hard_negatives_need_captions_naming_two_shapes(pairs_root, tmp_path):
    with pytest.raises(MindhierError, match="hard-negatives needs captions that name at least two"):
        train_vision.train(args_for(pairs_root, tmp_path / "v", hard_negatives="shape"), Dist(0, 1, 0, torch.device("cpu")))


@pytest.fixture(scope="module")
def labelled_root(pairs_root, tmp_path_factory):
    """pairs_root plus scene labels (corpus/labels.npz): main_category 0, 3, 6, 9 by the square's colour."""
    import shutil

    from mindhier.data import layout

    root = tmp_path_factory.mktemp("labelled") / "pairs"
    shutil.copytree(pairs_root, root)
    category = (np.arange(64) % 4) * 3
    layout.corpus_labels_path(root).parent.mkdir(parents=True, exist_ok=True)
    np.savez(layout.corpus_labels_path(root), main_category=category)
    return root, category


def shape_head_accuracy(out, root, labels) -> float:
    """Accuracy of the saved training-only head on the training images, through the released model."""
    from safetensors.torch import load_file

    from mindhier.data import ImageStore

    tensors = load_file(str(out / "vision.safetensors"))
    clip = load_vision(out)  # strict keys: the head is not part of the model
    train = np.arange(56)
    emb = torch.nn.functional.normalize(clip.image_embedding(torch.from_numpy(ImageStore(root).get(train))), dim=-1)
    logits = train_vision.HEAD_SCALE * emb @ tensors["train.shape_head.weight"].T + tensors["train.shape_head.bias"]
    return float((logits.argmax(1).numpy() == labels[train]).mean())


def test_label_loss_trains_a_head_on_the_embedding_and_resumes_exactly(labelled_root, tmp_path, capsys):
    root, labels = labelled_root
    cpu = Dist(0, 1, 0, torch.device("cpu"))
    train_vision.train(args_for(root, tmp_path / "full", epochs=12, no_bf16=True, label_loss=1), cpu)
    full = losses_from(capsys)
    assert shape_head_accuracy(tmp_path / "full", root, labels) >= 0.9
    assert read_metadata(tmp_path / "full" / "vision")["train"]["label_loss"] == 1
    # the head's loss is part of the objective: without it the same run ends elsewhere
    train_vision.train(args_for(root, tmp_path / "plain", epochs=12, no_bf16=True), cpu)
    plain = losses_from(capsys)
    assert plain != pytest.approx(full, rel=1e-3)
    # interrupted after 6 of 12 epochs and resumed: the head and its optimiser state come back
    train_vision.train(args_for(root, tmp_path / "part", epochs=12, stop_after=6, no_bf16=True, label_loss=1), cpu)
    capsys.readouterr()
    with pytest.raises(MindhierError, match="--label-loss 1.0, not 0.0"):
        train_vision.train(args_for(root, tmp_path / "part", epochs=12, resume=True), cpu)
    train_vision.train(args_for(root, tmp_path / "part", epochs=12, no_bf16=True, resume=True, label_loss=1), cpu)
    assert losses_from(capsys) == pytest.approx(full[6:], rel=1e-4)
    assert shape_head_accuracy(tmp_path / "part", root, labels) == shape_head_accuracy(tmp_path / "full", root, labels)


def test_label_loss_needs_scene_labels(pairs_root, tmp_path):
    from mindhier.data import DataError

    with pytest.raises(DataError, match="--label-loss needs scene labels"):
        train_vision.train(args_for(pairs_root, tmp_path / "v", label_loss=1), Dist(0, 1, 0, torch.device("cpu")))
