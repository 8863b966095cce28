"""`mindhier probe-vision`: per-layer linear probes on a world's test stimuli read what the
features carry, no more (features without information score the majority guess exactly)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mindhier.cli import main
from mindhier.vision.probes import PROBED, probe_layers, token_features


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe") / "world"
    assert main(["world", "--preset", "tiny", "--out", str(root), "--quiet"]) == 0
    return root


class LabelVision(torch.nn.Module):
    """A stand-in vision model whose layer 1 carries exactly the main object's colour (its CLS
    token is the one-hot colour, looked up from the picture) and whose layer 2 and embedding
    carry nothing (zeros)."""

    def __init__(self, world):
        super().__init__()
        from mindhier.data import ImageStore
        from mindhier.world.corpus import world_labels

        store = ImageStore(world)
        images = torch.from_numpy(store.get(np.arange(store.num_images)))
        colours = world_labels(world)["main_colour"]
        self.colour_of = {self.key(im): int(c) for im, c in zip(images, colours)}
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @staticmethod
    def key(image):
        return image.float().mul(255).round().to(torch.uint8).numpy().tobytes()

    def image_layer_features(self, images01, layers):
        onehot = F.one_hot(torch.tensor([self.colour_of[self.key(im)] for im in images01]), 12).float()
        tokens = torch.zeros(len(images01), 1 + 4, 12)
        tokens[:, 0] = onehot
        return [tokens if g == 1 else torch.zeros_like(tokens) for g in layers]

    def image_embedding(self, images01):
        return torch.zeros(len(images01), 8)


def test_token_features_keep_cls_and_pool_large_grids():
    tokens = torch.arange(2 * 257 * 3, dtype=torch.float32).view(2, 257, 3)  # CLS + 16×16 patches
    out = token_features(tokens)
    assert out.shape == (2, 3 + 8 * 8 * 3)
    assert torch.equal(out[:, :3], tokens[:, 0])
    grid = tokens[:, 1:].transpose(1, 2).reshape(2, 3, 16, 16)
    assert torch.allclose(out[:, 3:], F.avg_pool2d(grid, 2).flatten(1))
    with pytest.raises(ValueError, match="square patch grid"):
        token_features(torch.zeros(1, 11, 3))


def test_probes_read_what_a_layer_carries_and_nothing_from_zeros(world):
    result = probe_layers(LabelVision(world), world, (1, 2))
    rates = result["rates"]
    assert set(rates) == {"layer 1", "layer 2", "embedding", "majority guess"}
    for k in PROBED:  # no information: the probe predicts the training set's most frequent class
        assert rates["layer 2"][k]["rate"] == rates["majority guess"][k]["rate"]
        assert rates["embedding"][k]["rate"] == rates["majority guess"][k]["rate"]
    assert rates["layer 1"]["main_colour"]["rate"] == 1.0 > rates["majority guess"]["main_colour"]["rate"]
    assert result["test_images"] == rates["layer 1"]["main_colour"]["n"] == 20


def test_probe_vision_command_writes_json_and_markdown(world, tmp_path, capsys):
    vision = tmp_path / "vision"
    assert main(["train-vision", "--data", str(world), "--out", str(vision), "--preset", "tiny",
                 "--epochs", "1", "--global-batch", "32"]) == 0
    assert main(["probe-vision", "--vision", str(vision / "vision"), "--world", str(world),
                 "--all-layers", "--out", str(tmp_path / "probe.v1")]) == 0   # a dot in OUT is kept
    result = json.loads((tmp_path / "probe.v1.json").read_text())
    depth = len(result["layers"])
    assert result["layers"] == list(range(1, depth + 1)) and depth >= 2
    assert set(result["rates"]) == {*(f"layer {g}" for g in result["layers"]), "embedding", "majority guess"}
    assert "| layer 1 |" in (tmp_path / "probe.v1.md").read_text() and "| embedding |" in capsys.readouterr().out
