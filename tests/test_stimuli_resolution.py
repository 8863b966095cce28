"""Stage 2's stimuli: every source a data folder holds, the largest picked, a source named
directly, and the refusal (with its override) to train a generator on upsampled small images."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from PIL import Image

from mindhier.data import DataError, ImageStore, layout
from mindhier.data import stimuli
from mindhier.data.readers import image_source_at, image_sources
from mindhier.errors import MindhierError

N = 6


def write_sources(root, small: int = 8, brick: int = 12, png: int = 10) -> dict:
    """The 224-px file's stand-in (``small`` px), NSD's imgBrick (``brick`` px) and a PNG folder."""
    rng = np.random.default_rng(0)
    data = {"small": rng.random((N, 3, small, small)).astype(np.float16),
            "brick": rng.integers(0, 256, (N, brick, brick, 3), dtype=np.uint8),
            "png": rng.integers(0, 256, (N, png, png, 3), dtype=np.uint8)}
    with h5py.File(layout.images_hdf5_path(root), "w") as f:
        f.create_dataset(layout.IMAGES_DATASET, data=data["small"])
    with h5py.File(layout.stimuli_hdf5_path(root), "w") as f:
        f.create_dataset(layout.NSD_STIMULI_DATASET, data=data["brick"])
    layout.images_dir(root).mkdir()
    for i in range(N):
        Image.fromarray(data["png"][i]).save(layout.image_png_path(root, i))
    return data


def one_image_store(path, side: int, brick: bool = False) -> ImageStore:
    with h5py.File(path, "w") as f:
        if brick:
            f.create_dataset(layout.NSD_STIMULI_DATASET, data=np.zeros((1, side, side, 3), np.uint8))
        else:
            f.create_dataset(layout.IMAGES_DATASET, data=np.zeros((1, 3, side, side), np.float16))
    return ImageStore(path.parent, source=path)


def test_default_store_is_unchanged_but_stage_2_takes_the_largest(tmp_path):
    data = write_sources(tmp_path)
    assert [k for k, _ in image_sources(tmp_path)] == ["hdf5", "imgbrick", "png"]
    assert ImageStore(tmp_path).kind == "hdf5"        # stage 1 and evaluation still read the 224-px file
    store = stimuli.open_largest(tmp_path)
    assert (store.kind, store.image_size, store.num_images) == ("imgbrick", (12, 12), N)
    np.testing.assert_array_equal(store.get([4, 1]), data["brick"][[4, 1]].transpose(0, 3, 1, 2) / np.float32(255))
    layout.stimuli_hdf5_path(tmp_path).unlink()
    assert stimuli.open_largest(tmp_path).kind == "png"   # 10 px beats 8 px


def test_a_source_named_directly(tmp_path):
    (tmp_path / "data").mkdir()
    data = write_sources(tmp_path / "data")
    folder = tmp_path / "full_size_pngs"
    folder.mkdir()
    for i in range(N):
        Image.fromarray(data["png"][i]).save(folder / f"image_{i:06d}.png")
    (folder / "image_000003.png").unlink()  # a gap in the folder
    store = stimuli.open_largest(tmp_path / "data", override=folder)
    assert (store.kind, store.path, store.image_size) == ("png", folder, (10, 10))
    np.testing.assert_allclose(store.get([2]), data["png"][[2]].transpose(0, 3, 1, 2) / 255.0, atol=1e-7)
    assert image_source_at(layout.stimuli_hdf5_path(tmp_path / "data"))[0] == "imgbrick"
    with pytest.raises(DataError, match="not found; pass NSD's nsd_stimuli.hdf5"):
        image_source_at(tmp_path / "nothing.hdf5")
    with pytest.raises(DataError, match="holds no image_XXXXXX.png"):
        image_source_at(tmp_path)
    with h5py.File(tmp_path / "other.hdf5", "w") as f:
        f.create_dataset("pixels", data=np.zeros(3))
    with pytest.raises(DataError, match=r"other.hdf5: no dataset 'images' or 'imgBrick' \(found: \['pixels'\]\)"):
        image_source_at(tmp_path / "other.hdf5")
    with pytest.raises(DataError, match=r"full_size_pngs/image_000003.png: image 3 not found"):
        store.get([3])


def test_upsampled_stimuli_are_refused_with_the_fix(tmp_path):
    store = one_image_store(layout.images_hdf5_path(tmp_path), 224)
    with pytest.raises(stimuli.StimuliResolutionError) as err:
        stimuli.check_resolution(store, 512, allow_upsampled=False)
    message = str(err.value)
    assert isinstance(err.value, MindhierError)
    for part in (str(store.path), "224×224 px", "512×512", "×2.29", "upsampling blur", "nsd_stimuli.hdf5",
                 "(73000, 425, 425, 3)", "--stimuli PATH", "--allow-upsampled-stimuli"):
        assert part in message, part
    record = stimuli.check_resolution(store, 512, allow_upsampled=True)
    assert record["allow_upsampled_stimuli"] is True and record["upsampling"] == pytest.approx(512 / 224, abs=1e-4)
    assert record["image_size"] == [224, 224] and record["kind"] == "hdf5"
    assert "UPSAMPLED" in stimuli.describe(record)


def test_nsd_own_stimuli_pass_at_the_paper_size(tmp_path):
    """425 → 512 is the paper's own setting; no more upsampling than that is allowed."""
    brick = one_image_store(layout.stimuli_hdf5_path(tmp_path), 425, brick=True)
    record = stimuli.check_resolution(brick, 512, allow_upsampled=False)
    assert record["kind"] == "imgbrick" and record["allow_upsampled_stimuli"] is False
    assert "UPSAMPLED" not in stimuli.describe(record)
    brick.close()
    (tmp_path / "x").mkdir()
    small = one_image_store(layout.images_hdf5_path(tmp_path / "x"), 212)
    with pytest.raises(stimuli.StimuliResolutionError):
        stimuli.check_resolution(small, 256, allow_upsampled=False)   # 256/212 > 512/425
    assert stimuli.check_resolution(one_image_store(tmp_path / "x" / "b.hdf5", 224), 256, False)["upsampling"] < 1.2


def test_stimuli_of_another_dataset_and_changed_stimuli(tmp_path):
    store = one_image_store(layout.images_hdf5_path(tmp_path), 8)
    stimuli.check_covers(store, np.array([0]))
    with pytest.raises(DataError, match="holds 1 images, but the trials use image index 5"):
        stimuli.check_covers(store, np.array([0, 5]))
    now = stimuli.check_resolution(store, 8, False)
    assert stimuli.diff_stimuli(None, now) == [] and stimuli.diff_stimuli(dict(now), now) == []
    assert stimuli.diff_stimuli({**now, "image_size": [4, 4]}, now) == [
        f"stimuli.image_size: expected [8, 8], checkpoint has [4, 4] ({store.path})"]
