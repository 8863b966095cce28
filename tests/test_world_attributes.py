"""Attribute probes (mindhier.world.attributes): labels, probes that can read, and the rates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mindhier.data import ImageStore, load_captions, layout
from mindhier.world import PRESETS, generate_world
from mindhier.world import attributes


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(PRESETS["tiny"], tmp_path_factory.mktemp("world") / "tiny", show_progress=False)


def _split(world):
    params = json.loads(layout.image_params_path(world).read_text())
    test = np.array(sorted(params["test_images"]))
    train = np.array([i for i in range(len(params["images"])) if i not in set(test.tolist())])
    return train, test


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """A stand-in 'embedding': 8×8 pixel block means (no network needed)."""
    return torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)


def test_labels_agree_with_the_captions(world):
    params = json.loads(layout.image_params_path(world).read_text())
    ids = np.arange(10)
    labels = attributes.attribute_labels(world, ids)
    captions = load_captions(world)
    for k, i in enumerate(ids):
        text = " ".join(str(c) for c in captions[i])
        assert params["categories"][labels["main_category"][k]] in text
        assert params["colours"][labels["main_colour"][k]] in text
    classes = attributes.attribute_classes(world)
    assert classes == {"main_category": 12, "main_colour": 12, "background_kind": 5, "background_colour": 12}


def test_probes_read_held_out_stimuli_and_not_other_images(world):
    train, test = _split(world)
    store = ImageStore(world)
    x_train = attributes.probe_features(torch.from_numpy(store.get(train)), _pixels)
    x_test = attributes.probe_features(torch.from_numpy(store.get(test)), _pixels)
    y_train, y_test = attributes.attribute_labels(world, train), attributes.attribute_labels(world, test)
    probes = attributes.AttributeProbes(x_train, y_train, attributes.attribute_classes(world))
    own = attributes.shown_rates(probes, x_test, y_test)
    chance = attributes.majority_rates(y_train, y_test)
    assert own["background_colour"] > chance["background_colour"] + 0.3
    # The same probes on the wrong images (each test image paired with another's stimulus).
    shuffled = attributes.shown_rates(probes, np.roll(x_test, 7, axis=0), y_test)
    assert shuffled["background_colour"] < own["background_colour"] - 0.3


def test_rates_on_constructed_predictions():
    class Fixed(attributes.AttributeProbes):
        def __init__(self, out):
            self.out = out

        def labels(self, features):
            return self.out

    truth = {"main_category": np.array([0, 1, 2, 3]), "main_colour": np.array([0, 0, 1, 1]),
             "background_kind": np.array([0, 0, 0, 0]), "background_colour": np.array([2, 2, 2, 2])}
    got = {**truth, "main_colour": np.array([0, 1, 1, 1]), "background_colour": np.array([2, 2, 0, 2])}
    rates = attributes.shown_rates(Fixed(got), np.zeros((4, 1)), truth)
    assert rates["main_category"] == 1.0 and rates["main_colour"] == 0.75 and rates["background_colour"] == 0.75
    assert rates["colours_both"] == 0.5          # image 1 misses the object, image 2 the background
    majority = attributes.majority_rates({**truth, "main_category": np.array([3, 3, 1, 0])}, truth)
    assert majority["main_category"] == 0.25 and majority["background_kind"] == 1.0


def test_a_folder_without_image_params_is_refused_clearly(tmp_path):
    from mindhier.errors import MindhierError

    with pytest.raises(MindhierError, match="image_params.json.*synthetic world"):
        attributes.attribute_labels(tmp_path, np.arange(3))
