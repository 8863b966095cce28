"""`prepare-nsd` on a tiny raw NSD tree written here (6×5×4 volumes, 2 sessions of 750 trials)."""

from __future__ import annotations

import gzip
import hashlib
import struct
import tarfile
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io
from PIL import Image

from mindhier.cli import main as cli_main
from mindhier.data import DataError, ImageStore, SubjectIndex, TestSet, TrainTrials, layout, read_behav_tar
from mindhier.data import prepare_nsd as prep

SHAPE, T, SESSIONS, N_IMAGES = (6, 5, 4), 750, 2, 12
N_SHARED_IMAGES = 4  # COCO indices 0..3 are "shared1000" images here, 4..11 the others
SUBJECTS = (1, 2)


def patch_nifti_slope(path: Path, slope: float) -> None:
    """Set scl_slope in a .nii.gz header (byte 112): the preparation must ignore it (SPEC §1.2)."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    struct.pack_into("<f", raw, 112, slope)
    path.write_bytes(gzip.compress(bytes(raw)))


def make_raw_nsd(root: Path) -> dict:
    rng = np.random.default_rng(0)
    order = np.empty(30000, dtype=np.int64)
    shared = rng.random(30000) < 0.1
    order[shared] = rng.integers(1, 1001, shared.sum())
    order[~shared] = rng.integers(1001, 10001, (~shared).sum())
    subjectim = np.empty((8, 10000), dtype=np.int64)
    subjectim[:, :1000] = rng.integers(1, N_SHARED_IMAGES + 1, (8, 1000))
    subjectim[:, 1000:] = rng.integers(N_SHARED_IMAGES + 1, N_IMAGES + 1, (8, 9000))
    design = prep.nsd_expdesign_path(root)
    design.parent.mkdir(parents=True)
    scipy.io.savemat(design, {"masterordering": order[None], "subjectim": subjectim,
                              "sharedix": np.arange(1, 1001)[None]})
    truth = {"order": order, "subjectim": subjectim, "raw": {}, "mask": {}}
    for s in SUBJECTS:
        mask = rng.choice([-1, 0, 1, 2], size=SHAPE).astype(np.int16)
        truth["mask"][s] = mask
        mpath = prep.nsd_mask_path(root, s)
        mpath.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(mask, np.eye(4)), mpath)
        for session in range(1, SESSIONS + 1):
            trials = slice((session - 1) * T, session * T)
            raw = rng.normal(0, 300, SHAPE + (T,)) + rng.normal(0, 900, SHAPE)[..., None]  # per-voxel offset
            raw[..., shared[trials]] += 3000  # shared trials far off: including them would move the mean
            raw = raw.round().astype(np.int16)
            truth["raw"][s, session] = raw
            path = prep.nsd_betas_path(root, s, session)
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(raw, np.eye(4)), path)
            patch_nifti_slope(path, 2.0)
    brick = rng.integers(0, 256, (N_IMAGES, 20, 20, 3), dtype=np.uint8)
    truth["brick"] = brick
    stim = prep.nsd_stimuli_path(root)
    stim.parent.mkdir(parents=True)
    with h5py.File(stim, "w") as f:
        f.create_dataset("imgBrick", data=brick)
    return truth


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    nsd, out = tmp_path_factory.mktemp("nsd"), tmp_path_factory.mktemp("prepared") / "out"
    truth = make_raw_nsd(nsd)
    summaries = prep.prepare_nsd(nsd, out, subjects=SUBJECTS, sessions=SESSIONS, show_progress=False)
    return nsd, out, truth, summaries


def expected_betas(truth: dict, subject: int) -> np.ndarray:
    """Independent recomputation: mask ≥ 1, ÷300, z-score with non-shared statistics."""
    keep = truth["mask"][subject] >= 1
    sessions = []
    for session in range(1, SESSIONS + 1):
        x = truth["raw"][subject, session][keep].T.astype(np.float64) / 300.0
        train = x[truth["order"][(session - 1) * T: session * T] > 1000]
        sessions.append((x - train.mean(0)) / train.std(0))
    return np.concatenate(sessions)


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_betas_divided_by_300_ignoring_header_slope(prepared):
    nsd, _, truth, _ = prepared
    path = prep.nsd_betas_path(nsd, 1, 1)
    mask = truth["mask"][1] >= 1
    scaled = np.asarray(nib.load(path).dataobj)  # what trusting the header's scl_slope would give
    np.testing.assert_allclose(scaled[mask].T, 2.0 * truth["raw"][1, 1][mask].T)
    got = prep.load_session_betas(path, mask, T)
    assert got.dtype == np.float32 and got.shape == (T, mask.sum())
    np.testing.assert_allclose(got, truth["raw"][1, 1][mask].T / 300.0, rtol=1e-6)


def test_betas_masked_and_zscored_without_shared_trials(prepared):
    _, out, truth, summaries = prepared
    for s in SUBJECTS:
        with h5py.File(layout.betas_path(out, s)) as f:
            betas = f["betas"][:]
        keep = truth["mask"][s] >= 1
        assert betas.dtype == np.float32 and betas.shape == (SESSIONS * T, keep.sum())
        expected = expected_betas(truth, s)
        np.testing.assert_allclose(betas, expected, atol=2e-5)
        # z-scoring over all trials (shared included) would give a clearly different answer
        first = truth["raw"][s, 1][keep].T / 300.0
        with_shared = (first - first.mean(0)) / first.std(0)
        assert np.abs(with_shared - betas[:T]).max() > 0.5
        assert summaries[s - 1]["voxels"] == keep.sum()


def test_tars_hold_the_design(prepared):
    _, out, truth, summaries = prepared
    order, subjectim = truth["order"][: SESSIONS * T], truth["subjectim"]
    shared = order <= 1000
    for s in SUBJECTS:
        coco = subjectim[s - 1, order - 1] - 1
        for session in range(SESSIONS):
            behav = read_behav_tar(layout.train_tar_path(out, s, session))
            rows = np.arange(session * T, (session + 1) * T)
            rows = rows[~shared[rows]]
            np.testing.assert_array_equal(behav[:, layout.COL_TRIAL], rows)  # sorted by key = by trial
            np.testing.assert_array_equal(behav[:, layout.COL_IMAGE], coco[rows])
            assert (behav[:, layout.COL_SHARED] == 0).all()
            assert (behav[:, layout.COL_SUBJECT] == s).all() and (behav[:, layout.COL_SESSION] == session + 1).all()
            other = np.delete(behav, [layout.COL_IMAGE, layout.COL_TRIAL, layout.COL_SHARED, layout.COL_SUBJECT,
                                      layout.COL_SESSION], axis=1)
            assert (other == -1).all()
        test = read_behav_tar(layout.test_tar_path(out, s))
        np.testing.assert_array_equal(test[:, layout.COL_TRIAL], np.flatnonzero(shared))
        np.testing.assert_array_equal(test[:, layout.COL_IMAGE], coco[shared])
        assert (test[:, layout.COL_SHARED] == 1).all() and (test[:, layout.COL_IMAGE] < N_SHARED_IMAGES).all()
        with tarfile.open(layout.test_tar_path(out, s)) as tar:
            names = tar.getnames()
        key = f"sample{np.flatnonzero(shared)[0]:09d}"
        assert {f"{key}.{m}.npy" for m in ("behav", "past_behav", "future_behav", "olds_behav")} <= set(names)
        assert summaries[s - 1]["test_trials"] == shared.sum()


def test_images_resized_bicubic_float16(prepared):
    _, out, truth, _ = prepared
    store = ImageStore(out)
    assert store.num_images == N_IMAGES and store.image_size == (224, 224)
    with h5py.File(layout.images_hdf5_path(out)) as f:
        assert f["images"].dtype == np.float16 and f["images"].shape == (N_IMAGES, 3, 224, 224)
    expected = np.asarray(Image.fromarray(truth["brick"][5]).resize((224, 224), Image.BICUBIC)).transpose(2, 0, 1) / 255.0
    np.testing.assert_allclose(store.get([5])[0], expected, atol=1e-3)


def test_prepared_folder_loads_with_the_readers(prepared):
    _, out, truth, _ = prepared
    index = SubjectIndex(out, 1, images=ImageStore(out))
    assert index.sessions == [0, 1] and len(index.train) + len(index.test) == SESSIONS * T
    np.testing.assert_array_equal(index.test.session, index.test.trial // T)
    train = TrainTrials(out, 1)
    np.testing.assert_allclose(train[0]["voxels"].numpy(), expected_betas(truth, 1)[train[0]["trial"]], atol=2e-5)
    test = TestSet(out, 1)
    assert list(test.image_indices) == sorted(set(test.image_indices)) and len(test) <= N_SHARED_IMAGES


def test_existing_outputs_are_not_overwritten_without_force(prepared, tmp_path):
    nsd, out, _, _ = prepared
    before = snapshot(out)
    with pytest.raises(DataError, match="already exist.*--force") as err:
        prep.prepare_nsd(nsd, out, subjects=[1], sessions=1, show_progress=False)
    assert str(out) in str(err.value)
    assert snapshot(out) == before
    # --force replaces: one session now, and no stale second-session tar is left behind
    copy = tmp_path / "copy"
    prep.prepare_nsd(nsd, copy, subjects=[1], sessions=SESSIONS, skip_images=True, show_progress=False)
    prep.prepare_nsd(nsd, copy, subjects=[1], sessions=1, skip_images=True, force=True, show_progress=False)
    assert sorted(p.name for p in (copy / "wds/subj01/train").iterdir()) == ["0.tar"]
    assert h5py.File(layout.betas_path(copy, 1))["betas"].shape[0] == T
    assert not list(copy.rglob("*.partial"))


def test_missing_session_fails_before_writing(prepared, tmp_path):
    nsd, _, _, _ = prepared
    with pytest.raises(DataError, match="betas_session03.nii.gz: betas not found.*--sessions"):
        prep.prepare_nsd(nsd, tmp_path / "o", subjects=[1], sessions=3, show_progress=False)
    assert not (tmp_path / "o").exists()


def test_mask_shape_mismatch_names_the_file(prepared, tmp_path):
    nsd, _, _, _ = prepared
    bad_mask = np.ones((6, 5, 3), dtype=np.int16)
    with pytest.raises(DataError, match=r"betas_session01.nii.gz: volume shape \(6, 5, 4, 750\) does not fit"):
        prep.load_session_betas(prep.nsd_betas_path(nsd, 1, 1), bad_mask >= 1, T)


def test_cli_prints_caption_source(prepared, tmp_path, capsys):
    nsd, _, _, _ = prepared
    out = tmp_path / "cli"
    rc = cli_main(["prepare-nsd", "--nsd-root", str(nsd), "--out", str(out), "--subjects", "2",
                   "--sessions", "1", "--skip-images"])
    text = capsys.readouterr().out
    assert rc == 0 and "subj02:" in text and "COCO annotations" in text and "MindEye2" in text
    assert not layout.captions_path(out).exists()  # never fabricated
    rc = cli_main(["prepare-nsd", "--nsd-root", str(nsd), "--out", str(out), "--subjects", "2", "--sessions", "1",
                   "--skip-images"])
    assert rc == 2 and "already exist" in capsys.readouterr().err


def test_full_size_stimuli_linked_for_stage_2(prepared):
    """NSD's own imgBrick reaches --out (a link: the real file is ~40 GB) beside the 224-px file;
    ImageStore still prefers the 224-px file, stage 2 can open the full-size one."""
    nsd, out, truth, _ = prepared
    link = layout.stimuli_hdf5_path(out)
    assert link.is_symlink() and link.resolve() == prep.nsd_stimuli_path(nsd).resolve()
    assert ImageStore(out).kind == "hdf5"
    full = ImageStore(out, source=layout.stimuli_hdf5_path(out))
    assert (full.kind, full.image_size) == ("imgbrick", (20, 20))
    np.testing.assert_array_equal(full.get_uint8([3, 7]), truth["brick"][[3, 7]].transpose(0, 3, 1, 2))


def test_full_size_stimuli_copied_or_left_out_and_never_written_through(prepared, tmp_path):
    nsd, _, _, _ = prepared
    source = prep.nsd_stimuli_path(nsd)
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    linked = tmp_path / "linked"
    prep.prepare_nsd(nsd, linked, subjects=[1], sessions=1, skip_images=True, show_progress=False)
    # --force with a copy replaces the link itself, not the NSD file it points to
    prep.prepare_nsd(nsd, linked, subjects=[1], sessions=1, skip_images=True, force=True, show_progress=False,
                     full_stimuli="copy")
    copy = layout.stimuli_hdf5_path(linked)
    assert not copy.is_symlink() and copy.read_bytes() == source.read_bytes()
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
    none = tmp_path / "none"
    prep.prepare_nsd(nsd, none, subjects=[1], sessions=1, skip_images=True, show_progress=False, full_stimuli="none")
    assert not layout.stimuli_hdf5_path(none).exists() and not list(none.rglob("*.partial"))
    with pytest.raises(DataError, match="nsd_stimuli.hdf5.*already exist.*--force"):
        prep.prepare_nsd(nsd, linked, subjects=[2], sessions=1, skip_images=True, show_progress=False)
    # --out being NSD's own stimuli folder: the source is left as it is
    prep.place_full_stimuli(source, source, "copy")
    assert not source.is_symlink() and hashlib.sha256(source.read_bytes()).hexdigest() == before
