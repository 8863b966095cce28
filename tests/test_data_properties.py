"""Property-based tests of the data readers (issue 13): whatever a bad download looks like — cut
short, bytes flipped, another dtype or shape — reading it either gives the data or fails with a
DataError whose message names the file, never another exception.

Each base file is built once per module; every example damages a copy in its own folder."""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from test_data import SUBJECT, VOXELS, behav_row, write_tar

from mindhier.data import BetasFile, DataError, ImageStore, layout, read_behav_tar

# Few examples and no deadline: the suite runs on 2 CPU cores beside other work. derandomize keeps
# CI repeatable (the same examples every run); drop it and raise max_examples to search wider.
FUZZ = settings(max_examples=30, deadline=None, database=None, derandomize=True)

TRIALS, N_IMAGES, SIZE = 12, 6, 5
STORAGE = {"contiguous": {}, "chunked": {"chunks": True}, "gzip": {"chunks": True, "compression": "gzip"}}
# one dtype of each kind h5py can store; only real numbers (i, u, f) are betas or pixels
H5_DTYPES = ["i1", "u2", "i8", "f2", "f4", ">f8", "?", "c8", "S4", h5py.string_dtype(),
             np.dtype([("a", "f4"), ("b", "i4")])]


# ----------------------------------------------------------------------------- damage


def cut(data, raw: bytes) -> bytes:
    return raw[: data.draw(st.integers(0, len(raw) - 1), label="cut at")]


def flip(data, raw: bytes, span: tuple[int, int] = (0, 2048)) -> bytes:
    """XOR a few bytes; half the draws land in ``span`` (by default the first 2 KiB, where tar
    and HDF5 headers live), the others anywhere."""
    where = st.one_of(st.integers(span[0], min(len(raw), span[1]) - 1), st.integers(0, len(raw) - 1))
    flips = data.draw(st.lists(st.tuples(where, st.integers(1, 255)), min_size=1, max_size=6), label="flips")
    out = bytearray(raw)
    for pos, mask in flips:
        out[pos] ^= mask
    return bytes(out)


def expect_data_error_naming(path, read) -> DataError:
    with pytest.raises(DataError) as err:
        read()
    assert str(path) in str(err.value), f"the message does not name {path}: {err.value}"
    return err.value


def read_or_data_error(path, read):
    """``read()``'s result, or None when it failed the allowed way (a DataError naming ``path``).
    Anything else propagates and fails the test with its traceback."""
    try:
        return read()
    except DataError as err:
        assert str(path) in str(err), f"the message does not name {path}: {err}"
        return None


@dataclass(frozen=True)
class Base:
    """A base file's bytes (kept out of the repr, which hypothesis prints for a failing example)."""

    name: str
    raw: bytes = field(repr=False)
    where: Callable = field(repr=False)  # root -> the file's path under it
    read: Callable = field(repr=False)  # root or path -> what the reader returns
    end: int = 0  # tars: where the end-of-archive block ends; a cut before it must be noticed
    expected: np.ndarray | None = field(default=None, repr=False)
    npy_header: tuple[int, int] = (0, 0)  # tars: the bytes of the first behav.npy's header


def new_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("case", numbered=True)


# ----------------------------------------------------------------------------- behav tars


@pytest.fixture(scope="module")
def tar_base(tmp_path_factory):
    """A 3-sample tar with MindEye2's extra members."""
    path = tmp_path_factory.mktemp("tar_base") / "0.tar"
    write_tar(path, {f"sample{r}": behav_row(r + 10, r, 0) for r in range(3)})
    with tarfile.open(path) as tar:
        members = list(tar)
        end = tar.offset + tarfile.BLOCKSIZE
    npy = next(m.offset_data for m in members if m.name.endswith(".behav.npy"))
    return Base("tar", path.read_bytes(), lambda root: root / "0.tar", read_behav_tar, end, read_behav_tar(path),
                npy_header=(npy, npy + 128))


@FUZZ
@given(data=st.data())
def test_truncated_tar_is_a_data_error_naming_it(tar_base, tmp_path_factory, data):
    path = tar_base.where(new_dir(tmp_path_factory))
    path.write_bytes(cut(data, tar_base.raw))
    if path.stat().st_size < tar_base.end:
        expect_data_error_naming(path, lambda: read_behav_tar(path))
    else:  # only the zero padding after the end-of-archive block is gone
        np.testing.assert_array_equal(read_behav_tar(path), tar_base.expected)


@FUZZ
@given(data=st.data())
def test_tar_with_flipped_bytes_reads_or_names_it(tar_base, tmp_path_factory, data):
    path = tar_base.where(new_dir(tmp_path_factory))
    path.write_bytes(flip(data, tar_base.raw))
    behav = read_or_data_error(path, lambda: read_behav_tar(path))
    if behav is not None:  # a flip inside a value changes the value: nothing can notice that
        assert behav.dtype == np.float64 and behav.ndim == 2 and behav.shape[1] == layout.BEHAV_COLUMNS


@FUZZ
@given(data=st.data())
def test_behav_npy_with_flipped_header_bytes_reads_or_names_the_tar(tar_base, tmp_path_factory, data):
    """numpy parses a .npy header with Python's tokenizer: damage there raises more than ValueError."""
    path = tar_base.where(new_dir(tmp_path_factory))
    path.write_bytes(flip(data, tar_base.raw, tar_base.npy_header))
    read_or_data_error(path, lambda: read_behav_tar(path))


def behav_dtypes():
    return st.one_of(hnp.scalar_dtypes(), hnp.byte_string_dtypes(), hnp.unicode_string_dtypes(),
                     hnp.array_dtypes(), st.just(np.dtype(object)))


def behav_shapes():
    good = st.sampled_from([(1, layout.BEHAV_COLUMNS), (layout.BEHAV_COLUMNS,)])
    return st.one_of(good, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=18))


@FUZZ
@pytest.mark.filterwarnings("ignore:Stored array in format 3.0")  # np.save of unicode field names
@given(dtype=behav_dtypes(), shape=behav_shapes())
def test_behav_of_another_dtype_or_shape_is_a_data_error_naming_the_tar(tmp_path_factory, dtype, shape):
    path = new_dir(tmp_path_factory) / "0.tar"
    odd = np.zeros(shape, dtype=dtype)
    write_tar(path, {"sample0": behav_row(1, 0, 0), "sample1": odd})
    if dtype.kind in "iuf" and odd.size == layout.BEHAV_COLUMNS and odd.ndim <= 2:
        assert read_behav_tar(path)[1].tolist() == [0.0] * layout.BEHAV_COLUMNS
    else:
        expect_data_error_naming(path, lambda: read_behav_tar(path))


def test_the_tar_fixture_reads_back(tar_base):
    """Guards the properties above against passing vacuously on a base the reader refuses."""
    behav = tar_base.expected
    assert behav.shape == (3, layout.BEHAV_COLUMNS) and list(behav[:, layout.COL_TRIAL]) == [0, 1, 2]
    assert tar_base.end < len(tar_base.raw)  # the tar ends in padding, so both branches of the cut test run


# ----------------------------------------------------------------------------- HDF5: betas, images, imgBrick


def read_betas(root):
    with BetasFile(root, SUBJECT) as betas:
        return betas.read_all()


def read_images(root):
    with ImageStore(root) as store:
        return store.get(np.arange(store.num_images))


HDF5 = {  # reader: (file path under a root, dataset, good data, read)
    "betas": (lambda root: layout.betas_path(root, SUBJECT), layout.BETAS_DATASET,
              np.random.default_rng(0).standard_normal((TRIALS, VOXELS)).astype(np.float32), read_betas),
    "images": (layout.images_hdf5_path, layout.IMAGES_DATASET,
               np.random.default_rng(1).random((N_IMAGES, 3, SIZE, SIZE)).astype(np.float16), read_images),
    "imgbrick": (layout.stimuli_hdf5_path, layout.NSD_STIMULI_DATASET,
                 np.random.default_rng(2).integers(0, 256, (N_IMAGES, SIZE, SIZE, 3), dtype=np.uint8), read_images),
}


def write_hdf5(path, key: str, values: np.ndarray, **storage) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=values, **storage)


@pytest.fixture(scope="module", params=[(r, s) for r in HDF5 for s in STORAGE], ids=lambda p: "-".join(p))
def hdf5_base(request, tmp_path_factory):
    """One reader's file, stored one way, as bytes; with where to write it and how to read it."""
    reader, storage = request.param
    where, key, values, read = HDF5[reader]
    path = where(tmp_path_factory.mktemp("hdf5_base"))
    write_hdf5(path, key, values, **STORAGE[storage])
    return Base(f"{reader}-{storage}", path.read_bytes(), where, read)


@FUZZ
@given(data=st.data())
def test_truncated_hdf5_is_a_data_error_naming_it(hdf5_base, tmp_path_factory, data):
    root = new_dir(tmp_path_factory)
    hdf5_base.where(root).write_bytes(cut(data, hdf5_base.raw))
    expect_data_error_naming(hdf5_base.where(root), lambda: hdf5_base.read(root))


@FUZZ
@given(data=st.data())
def test_hdf5_with_flipped_bytes_reads_or_names_it(hdf5_base, tmp_path_factory, data):
    root = new_dir(tmp_path_factory)
    hdf5_base.where(root).write_bytes(flip(data, hdf5_base.raw))
    values = read_or_data_error(hdf5_base.where(root), lambda: hdf5_base.read(root))
    if values is not None:  # a flip inside a value changes the value: nothing can notice that
        assert values.dtype == np.float32 and values.ndim in (2, 4)


def hdf5_shapes(ndim: int):
    return st.one_of(hnp.array_shapes(min_dims=ndim, max_dims=ndim, min_side=0, max_side=4),
                     hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4))


@FUZZ
@pytest.mark.parametrize("reader", list(HDF5))
@given(data=st.data())
def test_hdf5_of_another_dtype_or_shape_is_a_data_error_naming_it(reader, tmp_path_factory, data):
    where, key, good, read = HDF5[reader]
    dtype = np.dtype(data.draw(st.sampled_from(H5_DTYPES), label="dtype"))
    shape = data.draw(st.one_of(st.just(good.shape), hdf5_shapes(good.ndim)), label="shape")
    root = new_dir(tmp_path_factory)
    write_hdf5(where(root), key, np.full(shape, "" if dtype == object else 0, dtype=dtype))
    if dtype == good.dtype and _plausible_shape(reader, shape):
        assert read(root).shape == (shape if reader != "imgbrick" else (shape[0], 3, shape[1], shape[2]))
    elif reader == "betas" and dtype.kind in "iuf" and len(shape) == 2:
        read(root)  # another real dtype is read as stored (data-info reports a suspicious scale)
    elif reader == "images" and dtype.kind in "iuf" and _plausible_shape(reader, shape):
        read(root)  # zeros are in range whatever the real dtype
    else:
        expect_data_error_naming(where(root), lambda: read(root))


def _plausible_shape(reader: str, shape: tuple) -> bool:
    if reader == "betas":
        return len(shape) == 2
    return len(shape) == 4 and (shape[1] == 3 if reader == "images" else shape[3] == 3)


def test_the_hdf5_fixtures_read_back(tmp_path):
    """Guards the properties above against passing vacuously on files the readers refuse."""
    for reader, (where, key, values, read) in HDF5.items():
        for storage in STORAGE.values():
            root = tmp_path / f"{reader}-{len(storage)}"
            root.mkdir()
            write_hdf5(where(root), key, values, **storage)
            expected = values if reader == "betas" else values.astype(np.float32) / (255 if reader == "imgbrick" else 1)
            if reader == "imgbrick":
                expected = expected.transpose(0, 3, 1, 2)
            np.testing.assert_allclose(read(root), expected, rtol=0, atol=1e-6)
