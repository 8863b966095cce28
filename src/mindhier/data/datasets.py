"""Index tables and torch datasets over the MindEye2 layout (SPEC §1.1).

- :class:`SubjectIndex`: which trial row shows which image, per split, parsed from the tars.
- :class:`TrainTrials`: single training trials, map-style, so ``DistributedSampler`` gives each
  rank a disjoint share and an epoch is every trial once (the official code streams the tars
  and duplicates data across workers instead).
- :class:`TestSet`: one item per unique shared1000 image with its 3 repetitions, either
  averaged as voxels (MindHier/MindEye1, the default) or kept for averaging model outputs
  (MindEye2). Every result must state which policy it used.
- :func:`load_test_set`: the same as tensors with the stimuli beside them (:class:`TestData`),
  for notebooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mindhier.data import layout
from mindhier.data.readers import BetasFile, DataError, ImageStore, read_behav_tar
from mindhier.data.values import check_scale, sample_rows

# behav column 2 holds the 1-based session (NSD's responses table order: subject, session, …);
# not in layout.py, which names only the columns every reader needs.
TEST_REPETITIONS = 3  # NSD shows each shared1000 image 3 times (SPEC §1.1)
TEST_POLICIES = ("average", "repeats")


@dataclass(frozen=True)
class TrialTable:
    """One row per trial: ``image`` (image index), ``trial`` (row in the betas file),
    ``session`` (0-based: the train tar number; for test trials behav column 2 − 1, or
    ``trial // 750`` when that column is empty).
    Fields read as attributes or as ``table["image"]``."""

    image: np.ndarray
    trial: np.ndarray
    session: np.ndarray

    def __len__(self) -> int:
        return len(self.trial)

    def __getitem__(self, name: str) -> np.ndarray:
        return getattr(self, name)

    def select(self, mask: np.ndarray) -> "TrialTable":
        return TrialTable(self.image[mask], self.trial[mask], self.session[mask])

    @staticmethod
    def concat(tables: list["TrialTable"]) -> "TrialTable":
        if not tables:
            empty = np.zeros(0, dtype=np.int64)
            return TrialTable(empty, empty, empty)
        return TrialTable(*(np.concatenate([getattr(t, f) for t in tables]) for f in ("image", "trial", "session")))


def _table_from_behav(behav: np.ndarray, path: Path, session: np.ndarray | int) -> TrialTable:
    for col, what in ((layout.COL_IMAGE, "image index (column 0)"), (layout.COL_TRIAL, "trial (column 5)")):
        values = behav[:, col]
        bad = np.flatnonzero(~np.isfinite(values) | (values < 0) | (values != np.round(values)))
        if bad.size:
            raise DataError(f"{path}: sample {bad[0]} has {what} = {values[bad[0]]}; every sample needs a "
                            "whole, non-negative value — the tar is damaged or not MindEye2's.")
    image = behav[:, layout.COL_IMAGE].astype(np.int64)
    trial = behav[:, layout.COL_TRIAL].astype(np.int64)
    session = np.broadcast_to(np.asarray(session, dtype=np.int64), trial.shape).copy()
    return TrialTable(image, trial, session)


def _test_sessions(behav: np.ndarray) -> np.ndarray:
    """0-based session of each test trial: behav column 2 when filled in, else NSD's row
    numbering (750 trials per session)."""
    session = behav[:, layout.COL_SESSION]
    if behav.size and (session >= 1).all():
        return session.astype(np.int64) - 1
    return behav[:, layout.COL_TRIAL].astype(np.int64) // layout.TRIALS_PER_SESSION


class SubjectIndex:
    """Index tables of one subject: ``.train`` from every ``wds/subjXX/train/{i}.tar`` (session
    = i) and ``.test`` from ``new_test/0.tar``. Checks trial rows against the betas file and,
    when ``images`` (an :class:`ImageStore` or an image count) is given, image indices."""

    def __init__(self, root: str | Path, subject: int, images: ImageStore | int | None = None, check_betas: bool = True):
        self.root, self.subject = Path(root), int(subject)
        train_dir = layout.train_tar_path(root, subject, 0).parent
        tars = sorted((p for p in train_dir.glob("*.tar") if p.stem.isdigit()), key=lambda p: int(p.stem))
        if not tars:
            raise DataError(f"{train_dir}: no training tars (0.tar, 1.tar, …) for subject {subject}; {_hint()}.")
        self.sessions = [int(p.stem) for p in tars]
        tables = {p: _table_from_behav(read_behav_tar(p), p, int(p.stem)) for p in tars}
        test_path = layout.test_tar_path(root, subject)
        test_behav = read_behav_tar(test_path)
        tables[test_path] = _table_from_behav(test_behav, test_path, _test_sessions(test_behav))
        self.train, self.test = TrialTable.concat([tables[p] for p in tars]), tables[test_path]
        if check_betas:  # before the duplicate check: a shifted tar can collide with a good one
            with BetasFile(root, subject) as betas:
                for path, table in tables.items():
                    _check_rows(table, path, betas.num_trials, betas.path)
        _check_unique_rows(tables)
        self._check_disjoint(train_dir, test_path)
        if images is not None:
            self._check_images(images.num_images if isinstance(images, ImageStore) else int(images))

    def _check_disjoint(self, train_dir: Path, test_path: Path) -> None:
        leaked = np.intersect1d(self.train.image, self.test.image)
        if leaked.size:
            raise DataError(f"{train_dir}/: {leaked.size} test images (e.g. {leaked[0]}) also appear in training trials; "
                            f"training must not see the shared1000 images of {test_path} — rebuild the tars.")

    def _check_images(self, num_images: int) -> None:
        top = max(self.train.image.max(initial=-1), self.test.image.max(initial=-1))
        if top >= num_images:
            raise DataError(f"{layout.wds_dir(self.root, self.subject)}: image index {top} is out of range — the image "
                            f"file holds {num_images} images; use the image file that belongs to these tars.")

    @property
    def test_images(self) -> np.ndarray:
        """Unique test image indices, ascending (the order every test result uses)."""
        return np.unique(self.test.image)

    def __repr__(self) -> str:
        return (f"SubjectIndex(subject={self.subject}, sessions={len(self.sessions)}, train={len(self.train)}, "
                f"test={len(self.test)} trials/{len(self.test_images)} images)")


def _check_rows(table: TrialTable, tar: Path, num_trials: int, betas_path: Path) -> None:
    """Every trial row of one tar lies inside the betas file; the error names this tar."""
    bad = np.flatnonzero(table.trial >= num_trials)
    if bad.size:
        lo, hi = table.trial[bad].min(), table.trial[bad].max()
        seen = f"row {lo}" if lo == hi else f"rows {lo}..{hi}"
        raise DataError(f"{tar}: {bad.size} of {len(table)} samples (the first is sample #{bad[0]} in key order) "
                        f"refer to betas {seen}, but {betas_path} holds {num_trials} rows "
                        f"(0..{num_trials - 1}); this tar and the betas file come from different sources or "
                        "sessions — use the tar from the same download or preparation as the betas file.")


def _check_unique_rows(tables: dict[Path, TrialTable]) -> None:
    """Each betas row is one trial: name the tar(s) whose samples share a row."""
    rows, counts = np.unique(np.concatenate([t.trial for t in tables.values()]), return_counts=True)
    if not (counts > 1).any():
        return
    row = rows[counts > 1][0]
    holders = [f"{p} ({int((t.trial == row).sum())}×)" for p, t in tables.items() if (t.trial == row).any()]
    raise DataError(f"{' and '.join(holders)}: trial row {row} appears in more than one sample "
                    f"({int((counts > 1).sum())} rows are shared); each betas row is one trial — the tars are "
                    "damaged or mixed from two sources.")


def _hint() -> str:
    return "create the data with `mindhier world` or `mindhier prepare-nsd`"


class TrainTrials(Dataset):
    """Single training trials (no averaging) of one subject, as a map-style dataset.

    Item ``i`` is ``dict(voxels=FloatTensor (V,), image_index=int, trial=int)``. ``sessions``
    selects train tars by number (0-based; ``None`` = all). ``in_memory`` reads the needed
    betas rows once (demo scale); otherwise each item is read from the HDF5 file."""

    def __init__(self, root: str | Path, subject: int, sessions=None, in_memory: bool = True,
                 expected_voxels: int | None = None, index: SubjectIndex | None = None):
        index = index or SubjectIndex(root, subject)
        table = index.train
        if sessions is not None:
            wanted = np.asarray(sorted(set(int(s) for s in sessions)), dtype=np.int64)
            unknown = np.setdiff1d(wanted, index.sessions)
            if unknown.size:
                raise DataError(f"{layout.wds_dir(root, subject)}/train: session {unknown[0]} not found; "
                                f"available: 0..{max(index.sessions)} ({len(index.sessions)} tars).")
            table = table.select(np.isin(table.session, wanted))
        self.subject, self.table = int(subject), table
        self.image_indices = table.image
        self.trials = table.trial
        self.betas = BetasFile(root, subject, expected_voxels=expected_voxels)
        self.num_voxels = self.betas.num_voxels
        self._voxels = None
        try:
            if in_memory:
                self._voxels = torch.from_numpy(self.betas.read(self.trials))
            self._check_scale()
        finally:
            self.betas.close()  # reopened lazily by __getitem__ when not in memory

    def _check_scale(self) -> None:
        """Refuse raw (undivided, un-z-scored) betas here, before a training run learns from them."""
        picked = sample_rows(len(self.trials))
        values = self._voxels[picked].numpy() if self._voxels is not None else self.betas.read(self.trials[picked])
        check_scale(values, self.betas)

    def __len__(self) -> int:
        return len(self.trials)

    def __getitem__(self, i: int) -> dict:
        if self._voxels is not None:
            voxels = self._voxels[i]
        else:
            voxels = torch.from_numpy(self.betas.read(self.trials[i:i + 1])[0])
        return {"voxels": voxels, "image_index": int(self.image_indices[i]), "trial": int(self.trials[i])}


class TestSet(Dataset):
    """One item per unique test image, ascending image index, with its 3 repetitions.

    ``policy="average"``: voxels = mean of the 3 repetitions, (V,) — averaged before the
    encoder (MindHier, MindEye1; the default). ``policy="repeats"``: voxels (3, V) — the model
    runs on each and its outputs are averaged (MindEye2). Images shown fewer than 3 times
    are repeated up to 3 (SPEC §1.1); extra showings beyond 3 are ignored."""

    __test__ = False  # not a pytest class despite the name

    def __init__(self, root: str | Path, subject: int, policy: str = "average",
                 expected_voxels: int | None = None, index: SubjectIndex | None = None):
        if policy not in TEST_POLICIES:
            raise DataError(f"test policy {policy!r} unknown; choose one of {TEST_POLICIES}.")
        index = index or SubjectIndex(root, subject)
        self.subject, self.policy = int(subject), policy
        self.image_indices = index.test_images
        self.repeat_rows = self._repeat_rows(index.test)  # (n_images, 3) betas rows
        with BetasFile(root, subject, expected_voxels=expected_voxels) as betas:
            self.num_voxels = betas.num_voxels
            reps = betas.read(self.repeat_rows.reshape(-1)).reshape(len(self.image_indices), TEST_REPETITIONS, self.num_voxels)
        self._voxels = torch.from_numpy(reps.mean(axis=1) if policy == "average" else reps)

    def _repeat_rows(self, test: TrialTable) -> np.ndarray:
        rows = np.empty((len(self.image_indices), TEST_REPETITIONS), dtype=np.int64)
        self.shown = np.empty(len(self.image_indices), dtype=np.int64)  # showings found per image
        for k, image in enumerate(self.image_indices):
            trials = np.sort(test.trial[test.image == image])
            self.shown[k] = len(trials)
            rows[k] = trials[np.arange(TEST_REPETITIONS) % len(trials)]
        return rows

    def __len__(self) -> int:
        return len(self.image_indices)

    def __getitem__(self, i: int) -> dict:
        return {"voxels": self._voxels[i], "image_index": int(self.image_indices[i])}


@dataclass
class TestData:
    """A subject's held-out test set as tensors, ascending image index (MindEye2's order).

    voxels       (N, V) float32 z-scored betas, repetitions averaged (``policy="average"``), or
                 (N, 3, V) with the repetitions kept (``policy="repeats"``)
    stimuli      (N, 3, H, W) float32 in [0, 1], the images the subject saw
    image_index  (N,) int64, each image's index (what reconstruction seeds derive from)
    Index or slice it (``test[:8]``) for a smaller set."""

    __test__ = False  # not a pytest class despite the name

    voxels: torch.Tensor
    stimuli: torch.Tensor
    image_index: torch.Tensor
    subject: int
    policy: str

    def __len__(self) -> int:
        return len(self.image_index)

    def __getitem__(self, rows) -> "TestData":
        rows = slice(rows, rows + 1) if isinstance(rows, int) else rows
        return TestData(self.voxels[rows], self.stimuli[rows], self.image_index[rows], self.subject, self.policy)


def load_test_set(data: str | Path, subject: int = 1, policy: str = "average", limit: int | None = None) -> TestData:
    """The test voxels and stimuli of ``subject`` from a data folder in the MindEye2 layout (a
    world or prepared NSD). ``limit``: only the first N test images (reads less)."""
    test = TestSet(data, subject, policy=policy)
    n = len(test) if limit is None else max(0, min(int(limit), len(test)))
    index = np.asarray(test.image_indices[:n], dtype=np.int64)
    with ImageStore(data) as store:
        stimuli = torch.from_numpy(store.get(index)) if n else torch.zeros(0, 3, *store.image_size)
    voxels = torch.stack([test[i]["voxels"] for i in range(n)]) if n else torch.zeros(0, test.num_voxels)
    return TestData(voxels=voxels, stimuli=stimuli, image_index=torch.from_numpy(index),
                    subject=int(subject), policy=policy)
