"""Two processes that need the same target cache at once (issue 13): one builds it, the other
waits for the build lock and reuses that file; and two builders that see the same pid (two
containers sharing the folder) do not write one temporary file. Each time the cache opens, is
complete and equals a single-process build. Real processes ('spawn'); the stand-in vision model
of test_target_cache_cleanup, made slow so that two unlocked builds would overlap."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import types

import h5py
import numpy as np
import torch
from test_target_cache_cleanup import DIM, LAYERS, TOKENS, StubVision

from mindhier.data import layout
from mindhier.vision import targets
from mindhier.vision.targets import TargetCache, build_target_cache, cache_key, cached_targets

N_IMAGES, BATCH, BATCH_SECONDS = 12, 2, 0.3  # 6 batches: a build takes about 2 s
WAIT = 300  # seconds a child may take, imports included (the CI machine is busy)


class SlowVision(StubVision):
    """Targets that depend on each image, so rows of a mixed-up file would differ."""

    def image_targets(self, images: torch.Tensor, layers):
        time.sleep(BATCH_SECONDS)
        mean = images.mean(dim=(1, 2, 3))[:, None]
        return [(mean * g)[:, :, None].expand(-1, TOKENS, DIM) for g in layers], mean.expand(-1, DIM)


def make_images(root) -> None:
    images = np.random.default_rng(0).random((N_IMAGES, 3, 4, 4)).astype(np.float16)
    with h5py.File(layout.images_hdf5_path(root), "w") as f:
        f.create_dataset(layout.IMAGES_DATASET, data=images)


def cached_in_child(data_root, cache_dir, start, report) -> None:
    """One racer: waits for the other, asks for the cache, reports how often it built it."""
    built = []
    build = targets.build_target_cache
    targets.build_target_cache = lambda *args, **kw: built.append(1) or build(*args, **kw)
    start.wait(WAIT)
    cache = cached_targets(SlowVision(), data_root, LAYERS, cache_dir, with_text=False, batch_size=BATCH,
                           show_progress=False)
    report.put((len(built), str(cache.path)))


def build_in_child_with_pid(data_root, out, start, report) -> None:
    """One racer that builds directly (no lock) and sees pid 4242, as processes in two
    containers can."""
    targets.os = types.SimpleNamespace(**{**vars(os), "getpid": lambda: 4242})
    start.wait(WAIT)
    with targets.ImageStore(data_root) as store:
        build_target_cache(SlowVision(), store, np.arange(N_IMAGES), None, LAYERS, out, batch_size=BATCH,
                           show_progress=False)
    report.put((1, str(out)))


def race(child, *args) -> list[tuple[int, str]]:
    """Runs ``child`` in two spawned processes that start together; their reports."""
    ctx = mp.get_context("spawn")
    start, report = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=child, args=(*args, start, report)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(WAIT)
        assert [p.exitcode for p in procs] == [0, 0], "a racing process failed (its traceback is above)"
        return [report.get(timeout=10) for _ in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


def single_process_build(tmp_path) -> dict[str, np.ndarray]:
    root = tmp_path / "alone"
    root.mkdir()
    make_images(root)
    cache = cached_targets(SlowVision(), root, LAYERS, root / "cache", with_text=False, batch_size=BATCH,
                           show_progress=False)
    return {name: cache.rows_for(np.arange(N_IMAGES), [name])[name].numpy() for name in cache.names}


def assert_complete_and_equal(path, expected: dict[str, np.ndarray]) -> None:
    cache = TargetCache(path, expect_key=cache_key(SlowVision(), LAYERS, False))
    np.testing.assert_array_equal(cache.image_indices, np.arange(N_IMAGES))
    assert sorted(cache.names) == sorted(expected)
    for name, values in cache.rows_for(np.arange(N_IMAGES)).items():
        np.testing.assert_array_equal(values.numpy(), expected[name], err_msg=name)
    assert not list(path.parent.glob("*.tmp"))


def test_two_processes_build_the_cache_once_and_share_it(tmp_path):
    make_images(tmp_path)
    reports = race(cached_in_child, tmp_path, tmp_path / "cache")
    builds, paths = zip(*reports)
    assert sorted(builds) == [0, 1], f"builds per process: {builds}; the second should reuse the first's cache"
    assert paths[0] == paths[1]
    assert_complete_and_equal(tmp_path / paths[0], single_process_build(tmp_path))
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".h5", ".lock"]


def test_builders_with_the_same_pid_write_separate_temporary_files(tmp_path):
    make_images(tmp_path)
    out = tmp_path / "cache" / "targets.h5"
    race(build_in_child_with_pid, tmp_path, out)
    assert_complete_and_equal(out, single_process_build(tmp_path))
