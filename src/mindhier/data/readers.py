"""Readers for the MindEye2 layout of NSD (SPEC §1.1): behav tars, betas, images, captions.

Each reader checks what it reads and fails with a :class:`DataError` that names the file,
what is wrong with it and how to fix it, so a bad download never surfaces as a shape error
deep inside training. File names come from :mod:`mindhier.data.layout` only.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path

import h5py
import numpy as np

from mindhier.data import layout
from mindhier.errors import MindhierError

GET_DATA_HINT = (
    "create it with `mindhier world --out DIR` (synthetic data) or `mindhier prepare-nsd` "
    "(raw NSD), or download MindEye2's preprocessed NSD"
)


class DataError(MindhierError):
    """A data file is missing, damaged or inconsistent with the rest of the layout."""


REAL_KINDS = "iuf"  # numpy dtype kinds of real numbers: signed, unsigned, floating

# ----------------------------------------------------------------------------- behav tars


def read_behav_tar(path: str | Path) -> np.ndarray:
    """All ``{key}.behav.npy`` rows of one MindEye2 webdataset tar, as an (n, 17) float64
    array sorted by sample key. Other members (past/future/olds behav, anything else) are
    ignored: the tars only carry indices, the betas and images live in their own files."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tar file not found; {GET_DATA_HINT}.")
    rows = {}
    keys_seen = set()
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                key, _, suffix = name.partition(".")
                keys_seen.add(key)
                if suffix != "behav.npy":
                    continue
                if key in rows:
                    raise DataError(f"{path}: sample {key!r} has two behav.npy members; re-create the tar.")
                rows[key] = _parse_behav(path, key, tar.extractfile(member).read())
            _check_end_of_archive(path, tar.offset)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(
            f"{path}: cannot read the tar ({err}); the file is truncated or corrupt — "
            "download or generate it again."
        ) from None
    missing = sorted(keys_seen - rows.keys())
    if missing:
        raise DataError(
            f"{path}: sample {missing[0]!r} (and {len(missing) - 1} more) has no behav.npy member; "
            "every sample needs {key}.behav.npy — the tar is incomplete, create it again."
        )
    if not rows:
        return np.zeros((0, layout.BEHAV_COLUMNS), dtype=np.float64)
    return np.stack([rows[k] for k in sorted(rows, key=_natural_key)])


def _parse_behav(path: Path, key: str, raw: bytes) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as err:  # noqa: BLE001 — numpy parses the header with Python's tokenizer and
        # literal_eval, so damaged bytes raise ValueError, TokenError, TypeError…: all the file's fault
        raise DataError(f"{path}: {key}.behav.npy is not a readable numeric .npy ({err!r}); re-create the tar.") from None
    # real numbers only: complex and timedelta count as np.number, but cast to float silently wrong
    if arr.size != layout.BEHAV_COLUMNS or arr.ndim > 2 or arr.dtype.kind not in REAL_KINDS:
        raise DataError(
            f"{path}: {key}.behav.npy has shape {arr.shape} dtype {arr.dtype}; expected (1, "
            f"{layout.BEHAV_COLUMNS}) numbers (MindEye2 behav layout) — this tar was written by "
            "another tool or is damaged."
        )
    return arr.reshape(layout.BEHAV_COLUMNS).astype(np.float64)


def _check_end_of_archive(path: Path, offset: int) -> None:
    """A complete tar ends in zero blocks; tarfile silently stops at a missing one, which is
    how a download cut at a member boundary looks. Demand at least one zero block."""
    with open(path, "rb") as f:
        f.seek(offset)
        block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"no end-of-archive marker at byte {offset}")


def _natural_key(key: str):
    """'sample10' after 'sample9': compare digit runs as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


# ----------------------------------------------------------------------------- HDF5 helpers


# What h5py raises on a damaged file depends on the structure the damage hit: OSError for the
# superblock and for data reads, KeyError or RuntimeError for the object tree, ValueError or
# TypeError for a datatype it cannot map to numpy. Caught only around h5py calls.
HDF5_DAMAGE = (OSError, RuntimeError, KeyError, ValueError, TypeError)


def _damaged(path: Path, err: Exception) -> DataError:
    return DataError(f"{path}: not a readable HDF5 file ({err}); the file is truncated or corrupt — get it again.")


def _open_hdf5(path: Path, what: str) -> h5py.File:
    if not path.is_file():
        raise DataError(f"{path}: {what} not found; {GET_DATA_HINT}.")
    try:
        return h5py.File(path, "r")
    except HDF5_DAMAGE as err:
        raise _damaged(path, err) from None


def _dataset(f: h5py.File, path: Path, key: str) -> h5py.Dataset:
    try:
        # not f.get(key): it answers None for a damaged object, which would read as a missing one
        ds = f[key] if key in f else None  # noqa: SIM401
        if isinstance(ds, h5py.Dataset):
            _header = ds.shape, ds.dtype  # parsed here, so damage in them is a DataError too
            return ds
        found = sorted(f.keys())
    except HDF5_DAMAGE as err:
        raise _damaged(path, err) from None
    raise DataError(
        f"{path}: no dataset {key!r} (found: {found or 'nothing'}); the MindEye2 layout stores "
        f"it under {key!r} — rename the dataset or point to the right file."
    )


def _read_rows(ds: h5py.Dataset, rows: np.ndarray, path: Path) -> np.ndarray:
    """:func:`read_rows` where damage in the data (a cut chunk, a broken chunk index or gzip
    stream) only shows when read: a DataError naming the file."""
    try:
        return read_rows(ds, rows)
    except HDF5_DAMAGE as err:
        raise _damaged(path, err) from None


def _check_real(ds: h5py.Dataset, path: Path, what: str) -> None:
    """Real numbers only: strings or compounds fail later as a bare cast error, and bool or
    complex values cast silently to something that is not data."""
    if ds.dtype.kind not in REAL_KINDS:
        raise DataError(f"{path}: dataset {ds.name.lstrip('/')!r} has dtype {ds.dtype}; expected {what} — "
                        "this file was written by another tool or is damaged.")


def read_rows(ds: h5py.Dataset, rows: np.ndarray, chunk: int = 256) -> np.ndarray:
    """``ds[rows]`` for any order and duplicates. h5py fancy indexing needs sorted unique
    indices and is slow on long lists, so read sorted unique rows in chunks — a contiguous
    slice when the chunk is dense, fancy indexing when it is sparse — and scatter back."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    unique, inverse = np.unique(rows, return_inverse=True)
    out = np.empty((len(unique),) + ds.shape[1:], dtype=ds.dtype)
    for start in range(0, len(unique), chunk):
        part = unique[start:start + chunk]
        lo, hi = int(part[0]), int(part[-1]) + 1
        if hi - lo <= 4 * len(part):
            out[start:start + len(part)] = ds[lo:hi][part - lo]
        else:
            out[start:start + len(part)] = ds[part]
    return out[inverse]


def _check_indices(rows: np.ndarray, n: int, path: Path, what: str) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.size and not np.issubdtype(rows.dtype, np.integer):
        if not np.all(np.isfinite(rows)) or not np.all(rows == np.round(rows)):
            raise DataError(f"{path}: {what} must be whole numbers, got {rows.reshape(-1)[:5]}…")
    rows = rows.astype(np.int64).reshape(-1)
    bad = np.flatnonzero((rows < 0) | (rows >= n))
    if bad.size:
        raise DataError(
            f"{path}: {what} {int(rows[bad[0]])} is out of range — the file holds {n} "
            f"(valid 0..{n - 1}); the index tables and this file do not belong together."
        )
    return rows


# ----------------------------------------------------------------------------- betas


class _PerProcessFile:
    """An HDF5 file opened lazily, once per process: h5py handles must not cross a fork, so a
    copy sent to a DataLoader worker (pickled without the handle) reopens its own."""

    _file: h5py.File | None = None
    _pid: int | None = None

    def _handle(self, what: str) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = _open_hdf5(self.path, what), os.getpid()
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_pid": None}


class BetasFile(_PerProcessFile):
    """``betas_all_subjXX_fp32_renorm.hdf5``: (trials, voxels) float32 z-scored betas.

    Opened lazily and reopened after a fork, so one object can be handed to DataLoader
    workers (an h5py handle must not cross processes)."""

    def __init__(self, root: str | Path, subject: int, expected_voxels: int | None = None):
        self.root, self.subject = Path(root), int(subject)
        self.path = layout.betas_path(root, subject)
        self._file, self._pid = None, None
        try:
            self._check_shape(expected_voxels)
        except DataError:
            self.close()  # a failed open must not keep the file locked
            raise

    def _check_shape(self, expected_voxels: int | None) -> None:
        ds = self._ds()
        if ds.ndim != 2:
            raise DataError(
                f"{self.path}: dataset 'betas' has shape {ds.shape}; expected 2-D (trials, voxels) — "
                "volumes must be masked and flattened first (`mindhier prepare-nsd`)."
            )
        _check_real(ds, self.path, "real numbers (float32 z-scored betas)")
        self.num_trials, self.num_voxels = (int(s) for s in ds.shape)
        self.dtype = ds.dtype  # as stored: an integer dtype is a hint of undivided NSD betas
        if expected_voxels is not None and self.num_voxels != int(expected_voxels):
            raise DataError(self._voxel_mismatch(int(expected_voxels)))

    def _voxel_mismatch(self, expected: int) -> str:
        owner = [s for s, v in layout.NSD_VOXELS.items() if v == self.num_voxels]
        cause = (f"it has the nsdgeneral voxel count of NSD subject {owner[0]} — a file of another subject"
                 if owner and owner[0] != self.subject else
                 "the file was made with another mask/world, or the model was trained on another subject")
        return (f"{self.path}: subject {self.subject} betas have {self.num_voxels} voxels but "
                f"{expected} are expected; likely cause: {cause}. Use the matching data folder "
                "or retrain for this data.")

    def _ds(self) -> h5py.Dataset:
        file = self._handle(f"betas file of subject {self.subject}")
        return _dataset(file, self.path, layout.BETAS_DATASET)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Betas of the given trial rows (any order, duplicates allowed) as float32 (n, V)."""
        rows = _check_indices(rows, self.num_trials, self.path, "trial row")
        out = _read_rows(self._ds(), rows, self.path).astype(np.float32, copy=False)
        self._check_finite(out, rows)
        return out

    def read_all(self) -> np.ndarray:
        return self.read(np.arange(self.num_trials))

    def _check_finite(self, values: np.ndarray, rows: np.ndarray) -> None:
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():
            first = int(rows[np.flatnonzero(bad)[0]])
            n_bad = int(np.unique(rows[bad]).size)
            raise DataError(
                f"{self.path}: row {first} (and {n_bad - 1} more of the rows read) contains NaN/inf; "
                "re-run preparation (`mindhier prepare-nsd --force`: its mask drops voxels outside "
                "the brain and its z-scoring guards zero variance) or mask out the non-finite voxels."
            )

    def __repr__(self) -> str:
        return f"BetasFile({str(self.path)!r}, trials={self.num_trials}, voxels={self.num_voxels})"


# ----------------------------------------------------------------------------- images

RANGE_TOLERANCE = 1e-3  # float16 rounding of 1.0 and resampling overshoot stay inside this


def image_sources(root: str | Path) -> list[tuple[str, Path]]:
    """(kind, path) of every stimulus source in a data folder, in ImageStore's order of
    preference: the 224-px file, NSD's own full-size ``nsd_stimuli.hdf5``, the PNG folder."""
    found = [(kind, path) for kind, path in (("hdf5", layout.images_hdf5_path(root)),
                                             ("imgbrick", layout.stimuli_hdf5_path(root))) if path.is_file()]
    folder = layout.images_dir(root)
    if folder.is_dir() and any(folder.glob("image_*.png")):
        found.append(("png", folder))
    return found


def image_source_at(path: str | Path) -> tuple[str, Path]:
    """(kind, path) of a stimulus source named directly: an HDF5 file holding "images"
    (N, 3, H, W) or NSD's "imgBrick" (N, H, W, 3), or a folder of image_XXXXXX.png."""
    path = Path(path)
    if path.is_dir():
        if not any(path.glob("image_*.png")):
            raise DataError(f"{path}: folder holds no image_XXXXXX.png files; name the PNGs by their "
                            "COCO-73k index (image_000123.png) or pass an HDF5 stimulus file.")
        return "png", path
    if not path.is_file():
        raise DataError(f"{path}: stimulus file or folder not found; pass NSD's nsd_stimuli.hdf5, "
                        "a coco_images HDF5 file or a folder of image_XXXXXX.png.")
    try:
        with h5py.File(path, "r") as f:
            keys = sorted(f.keys())
    except HDF5_DAMAGE as err:
        raise _damaged(path, err) from None
    for key, kind in ((layout.IMAGES_DATASET, "hdf5"), (layout.NSD_STIMULI_DATASET, "imgbrick")):
        if key in keys:
            return kind, path
    raise DataError(f"{path}: no dataset 'images' or 'imgBrick' (found: {keys or 'nothing'}); "
                    "pass NSD's nsd_stimuli.hdf5 or a coco_images HDF5 file.")


class ImageStore(_PerProcessFile):
    """Stimulus images as float32 (n, 3, H, W) in [0, 1], from ``coco_images_224_float16.hdf5``
    (dataset "images", preferred), NSD's own ``nsd_stimuli.hdf5`` (dataset "imgBrick",
    (N, H, W, 3) uint8 — also the pretraining corpus's file) or the folder
    ``images/image_XXXXXX.png``. ``source``: one of those, named by a (kind, path) from
    :func:`image_sources` or by its path (:func:`image_source_at`), instead of the preferred one."""

    def __init__(self, root: str | Path, source: tuple[str, Path] | str | Path | None = None):
        self.root = Path(root)
        self._file, self._pid = None, None
        if source is None:
            found = image_sources(root)
            if not found:
                raise DataError(f"{layout.images_hdf5_path(root)}: image file not found (nor PNGs in "
                                f"{layout.images_dir(root)}/); {GET_DATA_HINT}.")
            source = found[0]
        self.kind, self.path = source if isinstance(source, tuple) else image_source_at(source)
        if self.kind == "png":
            self._init_png()
            return
        try:
            self._init_hdf5() if self.kind == "hdf5" else self._init_imgbrick()
        except DataError:
            self.close()  # a failed open must not keep the file locked
            raise

    def _init_hdf5(self) -> None:
        ds = self._ds()
        shape = ds.shape
        if len(shape) == 4 and shape[1] != 3 and shape[-1] == 3:
            raise DataError(
                f"{self.path}: dataset 'images' has shape {shape}, channels-last (N, H, W, 3); "
                "mindhier expects channels-first (N, 3, H, W) — convert it once with "
                "np.transpose(x, (0, 3, 1, 2)) into a new file."
            )
        if len(shape) != 4 or shape[1] != 3:
            raise DataError(f"{self.path}: dataset 'images' has shape {shape}; expected (N, 3, H, W) RGB images in [0, 1].")
        _check_real(ds, self.path, "real numbers (float16 RGB in [0, 1])")
        self.num_images = int(shape[0])
        self.image_size = (int(shape[2]), int(shape[3]))

    def _init_imgbrick(self) -> None:
        ds = self._ds()
        if ds.ndim != 4 or ds.shape[-1] != 3 or ds.dtype != np.uint8:
            raise DataError(f"{self.path}: dataset '{layout.NSD_STIMULI_DATASET}' has shape {ds.shape} dtype "
                            f"{ds.dtype}; expected (N, H, W, 3) uint8 as NSD's nsd_stimuli.hdf5.")
        self.num_images = int(ds.shape[0])
        self.image_size = (int(ds.shape[1]), int(ds.shape[2]))

    def _init_png(self) -> None:
        from PIL import Image

        found = {}
        for p in self.path.glob("image_*.png"):
            digits = p.stem[len("image_"):]
            if digits.isdigit():
                found[int(digits)] = p
        self._png = found
        self.num_images = max(found) + 1
        with Image.open(found[min(found)]) as im:
            self.image_size = (im.height, im.width)

    def _ds(self) -> h5py.Dataset:
        key = layout.IMAGES_DATASET if self.kind == "hdf5" else layout.NSD_STIMULI_DATASET
        return _dataset(self._handle("image file"), self.path, key)

    def get_uint8(self, indices) -> np.ndarray:
        """Images as stored, uint8 (n, 3, H, W): half the memory of float16 for large caches.
        Only for a uint8 source (``imgBrick``); float sources are rounded."""
        idx = _check_indices(np.atleast_1d(indices), self.num_images, self.path, "image index")
        if self.kind == "imgbrick":
            return np.ascontiguousarray(_read_rows(self._ds(), idx, self.path).transpose(0, 3, 1, 2))
        return np.round(self.get(idx) * 255).astype(np.uint8)

    def get(self, indices) -> np.ndarray:
        """Images ``indices`` (COCO-73k / world image indices) as float32 (n, 3, H, W) in [0, 1]."""
        idx = _check_indices(np.atleast_1d(indices), self.num_images, self.path, "image index")
        if self.kind == "imgbrick":
            return self.get_uint8(idx).astype(np.float32) / 255.0
        images = _read_rows(self._ds(), idx, self.path).astype(np.float32) if self.kind == "hdf5" else self._get_png(idx)
        lo, hi = (float(images.min()), float(images.max())) if images.size else (0.0, 1.0)
        if not np.isfinite([lo, hi]).all() or lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            hint = " — it looks like 0–255 pixel values: divide by 255" if hi > 1.5 else ""
            raise DataError(f"{self.path}: image values span [{lo:g}, {hi:g}], expected [0, 1]{hint}; re-create the image file.")
        return np.clip(images, 0.0, 1.0)

    def _get_png(self, idx: np.ndarray) -> np.ndarray:
        from PIL import Image

        out = np.empty((len(idx), 3) + self.image_size, dtype=np.float32)
        for i, j in enumerate(idx):
            p = self._png.get(int(j))
            if p is None:
                raise DataError(f"{self.path / f'image_{int(j):06d}.png'}: image {int(j)} not found; add the PNG or "
                                "use the HDF5 image file.")
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
            if arr.shape[:2] != self.image_size:
                raise DataError(f"{p}: image is {arr.shape[:2]}, the others are {self.image_size}; all images must share one size.")
            out[i] = arr.transpose(2, 0, 1)
        return out

    def __repr__(self) -> str:
        return f"ImageStore({str(self.path)!r}, n={self.num_images}, size={self.image_size})"


# ----------------------------------------------------------------------------- captions


def load_captions(root: str | Path) -> np.ndarray:
    """``COCO_73k_annots_curated.npy`` as an (N, k) array of str. Never unpickles: a pickle
    can run arbitrary code, so object arrays are refused with a way to convert them."""
    path = layout.captions_path(root)
    if not path.is_file():
        raise DataError(f"{path}: captions not found; {GET_DATA_HINT} (NSD itself has no captions: "
                        "MindEye2 curated them from the COCO annotations).")
    try:
        caps = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "allow_pickle" not in str(err):
            raise DataError(f"{path}: not a readable .npy file ({err}); get it again.") from None
        raise DataError(
            f"{path}: the captions are stored as Python objects (dtype=object), which numpy can only "
            "read by unpickling — mindhier never does that, since a pickle can run arbitrary code. "
            "If you trust the file's source, convert it once to a unicode string array, e.g. "
            "np.save(path, np.load(path, allow_pickle=True).astype(str)), and try again."
        ) from None
    if caps.dtype.kind == "S":
        caps = np.char.decode(caps, "utf-8")
    if caps.dtype.kind != "U" or caps.ndim not in (1, 2):
        raise DataError(f"{path}: expected an (N, k) array of strings, got shape {caps.shape} dtype {caps.dtype}.")
    return caps.reshape(len(caps), -1)


def caption_for(captions: np.ndarray, image_index: int, variant: int = 0) -> str:
    """Caption ``variant`` (taken modulo the non-empty captions) of one image. Images with
    fewer captions than columns are padded with empty strings in the curated file."""
    if not 0 <= image_index < len(captions):
        raise DataError(f"caption index {image_index} out of range: the captions file has {len(captions)} images.")
    options = [c for c in captions[image_index] if c.strip()]
    if not options:
        raise DataError(f"image {image_index} has no caption (all {captions.shape[1]} entries are empty).")
    return str(options[variant % len(options)])
