"""The pretraining corpus (SPEC §1.4): deterministic per seed, disjoint from the fMRI world,
readable by the toolkit's image reader, resumable, and refusing to overwrite what is not its own."""

from __future__ import annotations

import dataclasses
import json

import h5py
import numpy as np
import pytest

from mindhier.data import ImageStore, layout
from mindhier.world import PRESETS as WORLD
from mindhier.world import generate_world
from mindhier.world.corpus import (PRESETS, CorpusError, corpus_scene, held_out_images, load_labels,
                                   overlap_with_world, read_corpus_info, scene_labels, write_corpus)
from mindhier.world.images import CATEGORIES, sample_scenes

SMALL = dataclasses.replace(PRESETS["tiny"], size=120)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(SMALL, tmp_path_factory.mktemp("corpus") / "c", workers=1, show_progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(WORLD["tiny"], tmp_path_factory.mktemp("world") / "w", show_progress=False)


def test_corpus_is_read_by_the_image_store_with_labels_and_captions(corpus):
    store = ImageStore(corpus)
    assert store.kind == "imgbrick" and store.num_images == SMALL.size
    assert store.image_size == (SMALL.image_size, SMALL.image_size)
    images = store.get([0, 5, 5])
    assert images.shape == (3, 3, 32, 32) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0.05
    assert np.array_equal(store.get_uint8([7])[0], np.round(store.get([7])[0] * 255).astype(np.uint8))
    labels = load_labels(corpus)
    assert labels["present"].shape == (SMALL.size, len(CATEGORIES))
    caps = np.load(layout.captions_path(corpus))
    assert caps.shape[0] == SMALL.size
    # the caption names the main object, whose category is the label
    for i in (0, 50, 119):
        assert CATEGORIES[labels["main_category"][i]] in caps[i, 0]
        assert labels["present"][i, labels["main_category"][i]] == 1
    assert read_corpus_info(corpus)["config"] == dataclasses.asdict(SMALL)


def test_same_seed_same_pixels_other_seed_other_pixels(corpus, tmp_path):
    again = write_corpus(SMALL, tmp_path / "again", workers=2, show_progress=False)  # 2 workers: same bytes
    other = write_corpus(dataclasses.replace(SMALL, seed=1), tmp_path / "other", workers=1, show_progress=False)
    digest = lambda root: read_corpus_info(root)["images_sha256"]  # noqa: E731
    assert digest(again) == digest(corpus)
    assert digest(other) != digest(corpus)


def test_corpus_is_disjoint_from_the_fmri_world(corpus, world):
    result = overlap_with_world(corpus, world)
    assert result == {"corpus_images": SMALL.size, "world_images": WORLD["tiny"].n_images,
                      "pixel_identical": 0, "same_scene_parameters": 0}
    # the check can fire: the world's own scenes, drawn on the world's stream, would all collide
    world_first = sample_scenes(WORLD["tiny"].seed, 3)
    assert corpus_scene(WORLD["tiny"].seed, 0) != world_first[0]


def test_labels_follow_the_scene_parameters():
    scenes = [corpus_scene(0, i) for i in range(40)]
    lab = scene_labels(scenes)
    for i, s in enumerate(scenes):
        main = s.objects[0]
        assert CATEGORIES[lab["main_category"][i]] == main.category
        row, col = divmod(int(lab["main_cell"][i]), 3)
        assert row == min(2, int(main.y * 3)) and col == min(2, int(main.x * 3))
        assert lab["present"][i].sum() == len({o.category for o in s.objects})
    assert len(np.unique(lab["main_cell"])) > 3


def test_interrupted_write_resumes_to_the_same_corpus(corpus, tmp_path, monkeypatch):
    from mindhier.world import corpus as corpus_mod

    monkeypatch.setattr(corpus_mod, "CHUNK", 40)
    out = tmp_path / "resumed"
    calls = {"n": 0}
    real = corpus_mod._save_partial_labels

    def crash_in_second_chunk(*args):
        # killed after chunk 2's labels were saved but before its rows were marked done:
        # the resumed write must redo chunk 2 and drop the extra label rows
        real(*args)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(corpus_mod, "_save_partial_labels", crash_in_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        write_corpus(SMALL, out, workers=1, show_progress=False)
    with h5py.File(layout.stimuli_hdf5_path(out), "r") as f:
        assert int(f.attrs["rows_done"]) == 40
    write_corpus(SMALL, out, workers=1, show_progress=False)  # resumes from row 40
    assert calls["n"] == 4
    assert read_corpus_info(out)["images_sha256"] == read_corpus_info(corpus)["images_sha256"]
    for k, v in load_labels(out).items():
        assert np.array_equal(v, load_labels(corpus)[k])


def test_refuses_to_overwrite(corpus, tmp_path):
    with pytest.raises(CorpusError, match="already holds this corpus"):
        write_corpus(SMALL, corpus, workers=1, show_progress=False)
    with pytest.raises(CorpusError, match="another corpus"):
        write_corpus(dataclasses.replace(SMALL, seed=3), corpus, workers=1, show_progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(CorpusError, match="holds other files"):
        write_corpus(SMALL, busy, workers=1, show_progress=False)
    assert (busy / "notes.txt").read_text() == "mine"


def test_held_out_images_are_every_50th():
    held = held_out_images(1000)
    assert held.tolist() == list(range(0, 1000, 50))


def test_imgbrick_of_wrong_dtype_is_refused(tmp_path):
    from mindhier.data import DataError

    with h5py.File(layout.stimuli_hdf5_path(tmp_path), "w") as f:
        f.create_dataset(layout.NSD_STIMULI_DATASET, data=np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(DataError, match="uint8"):
        ImageStore(tmp_path)


def test_corpus_command_checks_overlap(tmp_path, world, capsys):
    from mindhier.cli import main

    out = tmp_path / "cmd"
    assert main(["corpus", "--preset", "tiny", "--size", "50", "--out", str(out), "--workers", "1", "--quiet",
                 "--check-against", str(world)]) == 0
    overlap = json.loads((out / "corpus" / "overlap.json").read_text())
    assert overlap["pixel_identical"] == 0 and overlap["corpus_images"] == 50
