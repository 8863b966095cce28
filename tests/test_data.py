"""Readers and datasets of the MindEye2 layout, on small files written here (not the world)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from mindhier.data import (BetasFile, DataError, ImageStore, SubjectIndex, TestSet, TrainTrials, caption_for,
                           load_captions, read_behav_tar)
from mindhier.data import layout

SUBJECT, VOXELS, N_IMAGES, SIZE = 1, 7, 120, 8
# rows 0..14 session 0 train, 15..19 test, 20..34 session 1 train, 35..39 test
TRAIN_ROWS = {0: np.arange(0, 15), 1: np.arange(20, 35)}
TEST_ROWS = np.array([15, 16, 17, 18, 19, 35, 36, 37, 38, 39])
TEST_IMAGES = np.array([103, 101, 100, 102, 101, 100, 103, 103, 100, 101])  # 102 is shown only once


def behav_row(image: int, trial: int, shared: int) -> np.ndarray:
    row = -np.ones((1, layout.BEHAV_COLUMNS))
    row[0, layout.COL_IMAGE], row[0, layout.COL_TRIAL], row[0, layout.COL_SHARED] = image, trial, shared
    return row


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def write_tar(path: Path, samples: dict[str, np.ndarray], extra: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, behav in samples.items():
            members = {"behav.npy": behav}
            if extra:
                members |= {"past_behav.npy": -np.ones((1, 17)), "future_behav.npy": -np.ones((1, 17)),
                            "olds_behav.npy": -np.ones((1, 17)), "txt": "ignored"}
            for suffix, value in members.items():
                data = npy_bytes(value) if isinstance(value, np.ndarray) else value.encode()
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def make_layout(root: Path, betas: np.ndarray | None = None) -> dict:
    rng = np.random.default_rng(0)
    betas = rng.standard_normal((40, VOXELS)).astype(np.float32) if betas is None else betas
    with h5py.File(layout.betas_path(root, SUBJECT), "w") as f:
        f.create_dataset("betas", data=betas)
    train_images = {}
    for session, rows in TRAIN_ROWS.items():
        images = rng.integers(0, 100, len(rows))
        train_images[session] = images
        # keys deliberately written in reverse order: the reader must sort them
        samples = {f"sample{r:09d}": behav_row(i, r, 0) for r, i in zip(rows, images)}
        write_tar(layout.train_tar_path(root, SUBJECT, session), dict(reversed(list(samples.items()))))
    write_tar(layout.test_tar_path(root, SUBJECT),
              {f"sample{r:09d}": behav_row(i, r, 1) for r, i in zip(TEST_ROWS, TEST_IMAGES)})
    images = rng.random((N_IMAGES, 3, SIZE, SIZE)).astype(np.float16)
    with h5py.File(layout.images_hdf5_path(root), "w") as f:
        f.create_dataset("images", data=images)
    np.save(layout.captions_path(root), np.array([[f"image {i} caption {k}" for k in range(5)] for i in range(N_IMAGES)]))
    return {"betas": betas, "train_images": train_images, "images": images}


@pytest.fixture
def world(tmp_path):
    return tmp_path, make_layout(tmp_path)


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- readers


def test_read_behav_tar_sorts_by_key_and_ignores_other_members(world):
    root, data = world
    behav = read_behav_tar(layout.train_tar_path(root, SUBJECT, 0))
    assert behav.shape == (15, 17) and behav.dtype == np.float64
    np.testing.assert_array_equal(behav[:, layout.COL_TRIAL], TRAIN_ROWS[0])
    np.testing.assert_array_equal(behav[:, layout.COL_IMAGE], data["train_images"][0])
    assert (behav[:, 1] == -1).all()


def test_read_behav_tar_natural_key_order(tmp_path):
    path = tmp_path / "x.tar"
    write_tar(path, {"s10": behav_row(10, 10, 0), "s9": behav_row(9, 9, 0), "s100": behav_row(100, 100, 0)})
    assert list(read_behav_tar(path)[:, 0]) == [9, 10, 100]


def test_betas_read_any_order_and_duplicates(world):
    root, data = world
    rows = np.array([39, 3, 3, 0, 21, 39, 7])
    with BetasFile(root, SUBJECT) as betas:
        assert (betas.num_trials, betas.num_voxels) == (40, VOXELS)
        out = betas.read(rows)
        assert out.dtype == np.float32 and out.shape == (7, VOXELS)
        np.testing.assert_array_equal(out, data["betas"][rows])
        np.testing.assert_array_equal(betas.read_all(), data["betas"])
    # sparse rows take h5py's fancy-indexing path
    big = np.random.default_rng(1).standard_normal((2000, 3)).astype(np.float32)
    with h5py.File(layout.betas_path(root, 2), "w") as f:
        f.create_dataset("betas", data=big)
    sparse = np.array([1999, 0, 1000, 0, 1500])
    np.testing.assert_array_equal(BetasFile(root, 2).read(sparse), big[sparse])


def test_image_store_hdf5_and_png_agree(world, tmp_path_factory):
    root, data = world
    store = ImageStore(root)
    assert (store.kind, store.num_images, store.image_size) == ("hdf5", N_IMAGES, (SIZE, SIZE))
    got = store.get([5, 2, 5])
    assert got.dtype == np.float32 and got.shape == (3, 3, SIZE, SIZE)
    np.testing.assert_array_equal(got, data["images"][[5, 2, 5]].astype(np.float32))
    png_root = tmp_path_factory.mktemp("png")
    layout.images_dir(png_root).mkdir()
    pixels = (data["images"][:4].astype(np.float32) * 255).round().astype(np.uint8)
    for i in range(4):
        Image.fromarray(pixels[i].transpose(1, 2, 0)).save(layout.image_png_path(png_root, i))
    png = ImageStore(png_root)
    assert (png.kind, png.num_images, png.image_size) == ("png", 4, (SIZE, SIZE))
    np.testing.assert_allclose(png.get([3, 1]), pixels[[3, 1]] / 255.0, atol=1e-7)


def test_captions_roundtrip_and_object_arrays_refused(world):
    root, _ = world
    caps = load_captions(root)
    assert caps.shape == (N_IMAGES, 5) and caption_for(caps, 7, 6) == "image 7 caption 1"
    np.save(layout.captions_path(root), np.array([["a", ""], ["b", "c"]]))
    assert caption_for(load_captions(root), 0, 1) == "a"  # empty padding is skipped
    np.save(layout.captions_path(root), np.array([["a"], ["b"]], dtype=object), allow_pickle=True)
    before = snapshot(root)
    with pytest.raises(DataError, match="dtype=object") as err:
        load_captions(root)
    assert str(layout.captions_path(root)) in str(err.value)
    assert snapshot(root) == before


# ----------------------------------------------------------------------------- errors


def test_error_missing_file(world):
    root, _ = world
    layout.test_tar_path(root, SUBJECT).unlink()
    before = snapshot(root)
    with pytest.raises(DataError, match="not found") as err:
        SubjectIndex(root, SUBJECT)
    assert str(layout.test_tar_path(root, SUBJECT)) in str(err.value)
    with pytest.raises(DataError, match="not found") as err:
        BetasFile(root, 3)
    assert str(layout.betas_path(root, 3)) in str(err.value)
    assert snapshot(root) == before


def test_error_wrong_dataset_key(world):
    root, data = world
    with h5py.File(layout.betas_path(root, SUBJECT), "w") as f:
        f.create_dataset("data", data=data["betas"])
    before = snapshot(root)
    with pytest.raises(DataError, match=r"no dataset 'betas' \(found: \['data'\]\)") as err:
        BetasFile(root, SUBJECT)
    assert str(layout.betas_path(root, SUBJECT)) in str(err.value)
    assert snapshot(root) == before


def test_error_voxel_count_disagrees(world):
    root, data = world
    before = snapshot(root)
    with pytest.raises(DataError) as err:
        TrainTrials(root, SUBJECT, expected_voxels=VOXELS + 1)
    msg = str(err.value)
    assert str(layout.betas_path(root, SUBJECT)) in msg and "subject 1" in msg
    assert f"{VOXELS} voxels" in msg and f"{VOXELS + 1} are expected" in msg
    # a file holding another NSD subject's nsdgeneral voxel count is named as such
    with h5py.File(layout.betas_path(root, 5), "w") as f:
        f.create_dataset("betas", shape=(2, layout.NSD_VOXELS[2]), dtype="f4")
    with pytest.raises(DataError, match="NSD subject 2"):
        BetasFile(root, 5, expected_voxels=layout.NSD_VOXELS[5])
    layout.betas_path(root, 5).unlink()
    assert snapshot(root) == before


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_error_nonfinite_betas(tmp_path, bad):
    betas = np.random.default_rng(0).standard_normal((40, VOXELS)).astype(np.float32)
    betas[21, 3] = bad
    make_layout(tmp_path, betas)
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match="row 21 .*NaN/inf") as err:
        TrainTrials(tmp_path, SUBJECT)
    assert str(layout.betas_path(tmp_path, SUBJECT)) in str(err.value) and "prepare-nsd" in str(err.value)
    TrainTrials(tmp_path, SUBJECT, sessions=[0])  # rows that are fine still load
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("cut", ["middle", "member_boundary"])
def test_error_truncated_tar(world, cut):
    root, _ = world
    path = layout.train_tar_path(root, SUBJECT, 1)
    raw = path.read_bytes()
    if cut == "middle":
        raw = raw[: len(raw) // 2 + 100]
    else:  # cut right after a complete member: tarfile alone would not notice
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        raw = raw[: members[3].offset]
    path.write_bytes(raw)
    before = snapshot(root)
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        SubjectIndex(root, SUBJECT)
    assert str(path) in str(err.value)
    assert snapshot(root) == before


def test_error_sample_without_behav(tmp_path):
    path = tmp_path / "0.tar"
    write_tar(path, {"sample0": behav_row(1, 0, 0)})
    with tarfile.open(path, "a") as tar:
        info = tarfile.TarInfo("sample1.past_behav.npy")
        data = npy_bytes(np.zeros((1, 17)))
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match="'sample1'.*no behav.npy") as err:
        read_behav_tar(path)
    assert str(path) in str(err.value)
    write_tar(path, {"sample0": np.zeros((1, 16))})
    with pytest.raises(DataError, match=r"shape \(1, 16\)"):
        read_behav_tar(path)


def test_error_image_index_out_of_range(world):
    root, _ = world
    before = snapshot(root)
    with pytest.raises(DataError, match=f"image index {N_IMAGES} is out of range.*holds {N_IMAGES}") as err:
        ImageStore(root).get([0, N_IMAGES])
    assert str(layout.images_hdf5_path(root)) in str(err.value)
    with pytest.raises(DataError, match="image index 103 is out of range") as err:
        SubjectIndex(root, SUBJECT, images=100)
    assert str(layout.wds_dir(root, SUBJECT)) in str(err.value)
    assert snapshot(root) == before


def test_error_wrong_image_shape(world):
    root, data = world
    with h5py.File(layout.images_hdf5_path(root), "w") as f:
        f.create_dataset("images", data=data["images"].transpose(0, 2, 3, 1))
    before = snapshot(root)
    with pytest.raises(DataError, match=r"channels-last .*np.transpose\(x, \(0, 3, 1, 2\)\)") as err:
        ImageStore(root)
    assert str(layout.images_hdf5_path(root)) in str(err.value)
    with h5py.File(layout.images_hdf5_path(root), "w") as f:
        f.create_dataset("images", data=data["images"].astype(np.float32) * 255)
    with pytest.raises(DataError, match="divide by 255"):
        ImageStore(root).get([0])
    assert set(snapshot(root)) == set(before)


# ----------------------------------------------------------------------------- index and datasets


def test_subject_index_tables(world):
    root, data = world
    index = SubjectIndex(root, SUBJECT, images=ImageStore(root))
    assert index.sessions == [0, 1]
    np.testing.assert_array_equal(index.train.trial, np.concatenate([TRAIN_ROWS[0], TRAIN_ROWS[1]]))
    np.testing.assert_array_equal(index.train["image"], np.concatenate([data["train_images"][0], data["train_images"][1]]))
    np.testing.assert_array_equal(index.train.session, [0] * 15 + [1] * 15)
    np.testing.assert_array_equal(index.test.trial, TEST_ROWS)
    np.testing.assert_array_equal(index.test_images, [100, 101, 102, 103])
    np.testing.assert_array_equal(index.test.session, 0)  # behav column 2 empty: row // 750


def test_train_trials_with_distributed_sampler_cover_every_trial_once(world):
    root, data = world
    ds = TrainTrials(root, SUBJECT)
    assert len(ds) == 30 and ds.num_voxels == VOXELS
    seen = []
    for rank in (0, 1):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3, drop_last=False)
        seen += [ds[i]["trial"] for i in sampler]
    assert sorted(seen) == sorted(np.concatenate([TRAIN_ROWS[0], TRAIN_ROWS[1]]).tolist())  # 30 items: no padding
    item = ds[17]
    assert item["voxels"].dtype == torch.float32 and item["voxels"].shape == (VOXELS,)
    np.testing.assert_array_equal(item["voxels"].numpy(), data["betas"][item["trial"]])
    assert item["image_index"] == ds.image_indices[17] == data["train_images"][1][2]
    lazy = TrainTrials(root, SUBJECT, in_memory=False)
    for i in (0, 29, 17):
        torch.testing.assert_close(lazy[i]["voxels"], ds[i]["voxels"], rtol=0, atol=0)
    only1 = TrainTrials(root, SUBJECT, sessions=[1])
    assert sorted(only1.trials) == TRAIN_ROWS[1].tolist()
    with pytest.raises(DataError, match="session 5 not found"):
        TrainTrials(root, SUBJECT, sessions=[5])


def test_test_set_policies(world):
    root, data = world
    avg, reps = TestSet(root, SUBJECT), TestSet(root, SUBJECT, policy="repeats")
    assert avg.policy == "average" and reps.policy == "repeats"
    assert list(avg.image_indices) == [100, 101, 102, 103] == [avg[i]["image_index"] for i in range(len(avg))]
    for i, image in enumerate(avg.image_indices):
        rows = sorted(TEST_ROWS[TEST_IMAGES == image])
        rows = (rows * 3)[:3]  # image 102 was shown once: repeated to 3
        expected = np.stack([data["betas"][r] for r in rows])
        np.testing.assert_array_equal(reps[i]["voxels"].numpy(), expected)
        np.testing.assert_allclose(avg[i]["voxels"].numpy(), expected.astype(np.float64).mean(0), rtol=1e-6, atol=1e-7)
    assert reps[0]["voxels"].shape == (3, VOXELS) and avg[0]["voxels"].shape == (VOXELS,)
    assert list(avg.shown) == [3, 3, 1, 3]
    with pytest.raises(DataError, match="unknown"):
        TestSet(root, SUBJECT, policy="median")


def test_train_images_leaking_into_test_are_refused(world):
    root, _ = world
    write_tar(layout.train_tar_path(root, SUBJECT, 2), {"sample000000112": behav_row(101, 112, 0)})
    with pytest.raises(DataError, match="test images .* also appear in training"):
        SubjectIndex(root, SUBJECT, check_betas=False)


# ----------------------------------------------------------------------------- manifest and data-info


def test_data_manifest_is_deterministic_and_sees_changes(world, monkeypatch):
    from mindhier.data import manifest as mf

    root, data = world
    first = mf.data_manifest(root)
    assert first == mf.data_manifest(root, subjects=[1]) and first["subjects"] == [1] and first["world"] is None
    betas_name = layout.betas_path(root, SUBJECT).name
    entry = first["files"][betas_name]
    assert entry["scope"] == "full" and entry["sha256"] == hashlib.sha256(layout.betas_path(root, SUBJECT).read_bytes()).hexdigest()
    assert {"wds/subj01/train/0.tar", "wds/subj01/train/1.tar", "wds/subj01/new_test/0.tar",
            "coco_images_224_float16.hdf5", "COCO_73k_annots_curated.npy"} <= set(first["files"])
    layout.world_dir(root).mkdir()
    layout.world_info_path(root).write_text('{"config": {"preset": "tiny"}, "seed": 7}')
    betas = data["betas"].copy()
    betas[3, 2] += 1.0
    with h5py.File(layout.betas_path(root, SUBJECT), "r+") as f:
        f["betas"][...] = betas
    second = mf.data_manifest(root)
    assert second["world"] == {"seed": 7, "preset": "tiny"}
    problems = mf.diff_manifests(first, second)
    assert any(betas_name in p for p in problems) and any("synthetic world" in p for p in problems)
    assert mf.diff_manifests(second, mf.data_manifest(root)) == []
    # large files: first and last 8 MiB (here 1 KiB) plus size
    monkeypatch.setattr(mf, "FULL_HASH_LIMIT", 1024)
    monkeypatch.setattr(mf, "EDGE_BYTES", 512)
    raw = layout.betas_path(root, SUBJECT).read_bytes()
    edges = mf.data_manifest(root)["files"][betas_name]
    assert edges["scope"] == "edges"
    assert edges["sha256"] == hashlib.sha256(raw[:512] + raw[-512:] + str(len(raw)).encode()).hexdigest()
    # full=True: whole files whatever their size, so a change in the middle is seen
    whole = mf.data_manifest(root, full=True)
    assert whole["files"][betas_name] == {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest(), "scope": "full"}
    middle = len(raw) // 2
    assert 512 < middle < len(raw) - 512
    layout.betas_path(root, SUBJECT).write_bytes(raw[:middle] + bytes([raw[middle] ^ 1]) + raw[middle + 1:])
    assert mf.data_manifest(root)["files"][betas_name] == edges  # the edges cannot see it
    assert mf.diff_manifests(whole, mf.data_manifest(root, full=True)) != []


def test_data_info_summary_and_problems(world, capsys):
    from mindhier.cli import main as cli_main

    root, data = world
    assert cli_main(["data-info", str(root)]) == 0
    text = capsys.readouterr().out
    assert f"subj01: {VOXELS} voxels (NSD nsdgeneral: 15724), 40 betas rows" in text
    assert "2 sessions, 30 training trials on" in text and "test: 4 images (1 images ×1, 3 images ×3)" in text
    assert f"{N_IMAGES} images, 3×{SIZE}×{SIZE}" in text and f"captions: {N_IMAGES} images × 5" in text
    assert "not a synthetic world" in text and "no problems found" in text and "fewer than 3" in text
    assert f"largest stimuli here are {SIZE}×{SIZE} px" in text and "nsd_stimuli.hdf5" in text   # stage 2's
    layout.test_tar_path(root, SUBJECT).write_bytes(layout.test_tar_path(root, SUBJECT).read_bytes()[:700])
    assert cli_main(["data-info", str(root), "--subject", "1", "--full"]) == 1
    text = capsys.readouterr().out
    assert "problems:" in text and str(layout.test_tar_path(root, SUBJECT)) in text and "betas mean" in text
