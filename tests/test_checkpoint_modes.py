"""Checkpoint files honour the process umask: .safetensors and .json get the same mode; so do
the other .safetensors files mindhier writes (reconstructions, the generator's token cache).

safetensors writes its file 0600, so without a chmod a colleague on a shared cluster could
read a checkpoint's metadata but not its weights."""

import argparse
import os
import stat
import types

import numpy as np
import pytest
import torch

from mindhier.checkpoint import paths_for, save_checkpoint
from mindhier.pipeline_folder import copy_checkpoint


@pytest.fixture
def umask(request):
    """Set the process umask for one test and restore it afterwards, whatever happens."""
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(path) -> tuple[int, int]:
    return tuple(stat.S_IMODE(os.stat(p).st_mode) for p in paths_for(path))


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], indirect=True, ids=oct)
def test_save_checkpoint_files_get_the_umask_mode(tmp_path, umask):
    path = tmp_path / "ckpt" / "model"
    save_checkpoint(path, {"w": torch.ones(2, 3)}, kind="toy", config={"width": 3})
    expected = 0o666 & ~umask
    assert modes(path) == (expected, expected)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.json", "model.safetensors"]  # no temp files


@pytest.mark.parametrize("umask", [0o022, 0o077], indirect=True, ids=oct)
def test_current_umask_reads_without_changing_it(umask):
    from mindhier.checkpoint import current_umask

    assert current_umask() == umask and os.umask(umask) == umask


@pytest.mark.parametrize("umask", [0o022], indirect=True, ids=oct)
def test_pipeline_folder_copies_get_the_umask_mode(tmp_path, umask):
    src, dst = tmp_path / "src" / "model", tmp_path / "dst" / "model"
    save_checkpoint(src, {"w": torch.ones(2)}, kind="toy", config={"width": 2})
    for p in paths_for(src):
        os.chmod(p, 0o600)  # a private source must not make the released copy private too
    dst.parent.mkdir()
    copy_checkpoint(src, dst, "toy", None)
    assert modes(dst) == (0o644, 0o644)



def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002], indirect=True, ids=oct)
def test_reconstructions_get_the_umask_mode(tmp_path, umask):
    from mindhier.reconstruct import _write_outputs
    from mindhier.sampling import SamplingSettings

    image = torch.rand(3, 8, 8)
    merged = {r: {"image_index": i, "single-shot": image, "best-of-2": image, "chosen": 0}
              for r, i in enumerate((5, 9))}
    args = argparse.Namespace(encoder="e", tokenizer="t", generator="g", data="d", subject=1, averaging="voxels")
    _write_outputs(tmp_path, merged, 2, SamplingSettings(num_candidates=2), args, {"config": {"routing": "r"}})
    expected = 0o666 & ~umask
    written = sorted(tmp_path.glob("*.safetensors"))
    assert [p.name for p in written] == ["recons.safetensors", "recons_single-shot.safetensors"]
    assert {p.name: mode(p) for p in written} == {p.name: expected for p in written}
    assert mode(tmp_path / "settings.json") == expected


@pytest.mark.parametrize("umask", [0o022, 0o002], indirect=True, ids=oct)
def test_generator_token_cache_gets_the_umask_mode(tmp_path, umask):
    """Trainer._token_table on a stand-in trainer: one process, two images, fixed tokens."""
    from safetensors.torch import load_file

    from mindhier.train.generator import Trainer

    trainer = types.SimpleNamespace(
        out=tmp_path / "run", train=types.SimpleNamespace(image_indices=np.array([7, 3, 7])),
        tok_meta={"kind": "tokenizer", "config_hash": "abc"}, d=types.SimpleNamespace(is_main=True, enabled=False),
        _tokenize=lambda images: torch.arange(len(images) * 4).reshape(len(images), 4))
    table = Trainer._token_table(trainer)
    assert table["rows"] == {3: 0, 7: 1} and table["tokens"].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    path = tmp_path / "run" / "tokens.safetensors"
    assert load_file(str(path))["image_index"].tolist() == [3, 7]
    assert mode(path) == 0o666 & ~umask
