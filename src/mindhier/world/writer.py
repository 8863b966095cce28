"""Write a synthetic world to disk in exactly the MindEye2 layout of NSD (SPEC §1.1).

File names come from ``mindhier.data.layout``; the readers that load real NSD load this.

``behav.npy`` (1 × 17, float32, −1 = NaN) columns written here, after NSD's responses table:

    0 image index (0-based)   1 subject       2 session (1-based)   3 run (1-based, 12 per session)
    4 trial in run (1-based)  5 global trial = row in betas          6 time (−1)
    7 is_old (image shown before)             8 is_correct (−1)     9 reaction time (−1)
    10 change_mind (−1)       11 trials since this image's previous showing (−1 if first)
    12 trials since its first showing (−1 if first)                 13 (−1)
    14 repetition (0, 1, 2)   15 button (−1)  16 is_shared1000 (1 test image, 0 training)

``past_behav.npy`` / ``future_behav.npy`` (8 × 17): the behav rows of the 8 previous / next
trials of the experiment, nearest first, −1 padded. ``olds_behav.npy`` (2 × 17): the earlier
showings of the same image, most recent first, −1 padded. MindEye2 does not use them for
reconstruction; they are there so the files look like the real ones.

Determinism: tar members carry mtime 0 and no owner; HDF5 datasets are written without
timestamps (``track_times=False``), so one seed and preset give byte-identical files.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import h5py
import numpy as np

from mindhier.data import layout
from mindhier.data import layout as L
from mindhier.world.design import Design

RUNS_PER_SESSION = 12
CONTEXT_ROWS = 8  # rows of past_behav / future_behav
OLDS_ROWS = 2


def behav_table(design: Design) -> np.ndarray:
    """(T, 17) float32 behav rows of every trial of a subject (columns in the module doc)."""
    t = design.n_trials
    table = np.full((t, L.BEHAV_COLUMNS), -1.0, dtype=np.float32)
    run_len = -(-design.trials_per_session // RUNS_PER_SESSION)
    in_session = design.trial_in_session
    table[:, L.COL_IMAGE] = design.image
    table[:, L.COL_SUBJECT] = design.subject
    table[:, L.COL_SESSION] = design.session
    table[:, L.COL_RUN] = in_session // run_len + 1
    table[:, L.COL_TRIAL_IN_RUN] = in_session % run_len + 1
    table[:, L.COL_TRIAL] = np.arange(t)
    table[:, L.COL_IS_OLD] = design.repetition > 0
    table[:, L.COL_REPETITION] = design.repetition
    table[:, L.COL_SHARED] = design.is_test
    for trial, (prev, first) in enumerate(_previous_showings(design.image)):
        if prev >= 0:
            table[trial, L.COL_TRIALS_SINCE_LAST] = trial - prev
            table[trial, L.COL_TRIALS_SINCE_FIRST] = trial - first
    return table


def _previous_showings(image: np.ndarray) -> list[tuple[int, int]]:
    """Per trial: (trial of the previous showing, trial of the first showing), −1 if none."""
    last: dict[int, int] = {}
    first: dict[int, int] = {}
    out = []
    for t, i in enumerate(image.tolist()):
        out.append((last.get(i, -1), first.get(i, -1)))
        last[i] = t
        first.setdefault(i, t)
    return out


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def sample_arrays(table: np.ndarray, trial: int, olds: list[int]) -> dict[str, np.ndarray]:
    """The four .npy members of one trial's webdataset sample."""
    pad = np.full((CONTEXT_ROWS, L.BEHAV_COLUMNS), -1.0, dtype=np.float32)
    past, future = pad.copy(), pad.copy()
    before = table[max(0, trial - CONTEXT_ROWS):trial][::-1]
    after = table[trial + 1:trial + 1 + CONTEXT_ROWS]
    past[:len(before)], future[:len(after)] = before, after
    old = np.full((OLDS_ROWS, L.BEHAV_COLUMNS), -1.0, dtype=np.float32)
    for k, t in enumerate(olds[::-1][:OLDS_ROWS]):
        old[k] = table[t]
    return {"behav": table[trial:trial + 1], "past_behav": past, "future_behav": future, "olds_behav": old}


def write_tar(path: Path, table: np.ndarray, trials: np.ndarray, earlier: dict[int, list[int]]) -> None:
    """One webdataset tar holding ``trials`` (global trial numbers), keys sample{trial:09d}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for trial in trials.tolist():
            key = f"sample{trial:09d}"
            for name, array in sample_arrays(table, trial, earlier[trial]).items():
                _add_member(tar, f"{key}.{name}.npy", _npy_bytes(array))


def write_subject_tars(root: Path, design: Design) -> None:
    """``wds/subjXX/train/{session-1}.tar`` (non-test trials of each session) and
    ``wds/subjXX/new_test/0.tar`` (every test trial)."""
    table = behav_table(design)
    showings: dict[int, list[int]] = {}
    earlier: dict[int, list[int]] = {}
    for t, i in enumerate(design.image.tolist()):
        earlier[t] = list(showings.get(i, []))
        showings.setdefault(i, []).append(t)
    trials = np.arange(design.n_trials)
    for session in range(1, design.n_sessions + 1):
        rows = trials[design.session_rows(session)]
        write_tar(layout.train_tar_path(root, design.subject, session - 1), table,
                  rows[~design.is_test[rows]], earlier)
    write_tar(layout.test_tar_path(root, design.subject), table, trials[design.is_test], earlier)


def create_betas(root: Path, subject: int, n_trials: int, n_voxels: int) -> tuple[h5py.File, h5py.Dataset]:
    f = h5py.File(layout.betas_path(root, subject), "w")
    ds = f.create_dataset(layout.BETAS_DATASET, shape=(n_trials, n_voxels), dtype="float32", track_times=False)
    return f, ds


def zscore_session(raw: np.ndarray, is_test: np.ndarray) -> np.ndarray:
    """z-score every voxel with the mean/sd of the session's *training* trials only (SPEC
    §1.2: test statistics must not leak into the normalisation)."""
    ref = raw[~is_test] if (~is_test).sum() >= 2 else raw
    mean, std = ref.mean(axis=0), ref.std(axis=0)
    return ((raw - mean) / np.where(std > 1e-6, std, 1.0)).astype(np.float32)


def write_images(root: Path, images: np.ndarray) -> None:
    """(N, S, S, 3) float32 → ``coco_images_224_float16.hdf5`` "images" (N, 3, S, S) float16.
    The NSD file name is kept although S is the world's image size, not 224."""
    with h5py.File(layout.images_hdf5_path(root), "w") as f:
        f.create_dataset(layout.IMAGES_DATASET, data=images.transpose(0, 3, 1, 2).astype(np.float16),
                         track_times=False)


def write_captions(root: Path, captions: np.ndarray) -> None:
    np.save(layout.captions_path(root), captions, allow_pickle=False)
