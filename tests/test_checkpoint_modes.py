"""Checkpoint files honour the process umask: .safetensors and .json get the same mode.

safetensors writes its file 0600, so without a chmod a colleague on a shared cluster could
read a checkpoint's metadata but not its weights."""

import os
import stat

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

