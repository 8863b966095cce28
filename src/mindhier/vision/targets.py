"""On-disk cache of stage-1 targets, so encoder training never runs the vision model (SPEC §2).

One HDF5 file per (vision model, layers, caption policy, image set) holds, per image row:

    layer_{g}        (N, T, D)   fp16   visual_projection(post_layernorm(hidden_states[g]))
    final_embedding  (N, D)      fp16   CLIP image embedding
    text             (N, Tt, Dt) fp16   text tokens of caption ``i % 3`` of image i (official code)
    text_embedding   (N, D)      fp16   that caption's projected embedding
    image_indices    (N,)        int64  which image each row holds (ascending)

and as attributes the model identity (JSON), the layers and a format version. HDF5 lets a
training step read just the rows of its batch. The file name carries a hash of the key, and
:class:`TargetCache` re-checks the stored identity, so a cache made by another model or for
other layers is never used silently.

Processes that need the same cache at once (a sweep of encoder runs, two runs sharing a
targets folder) build it once: :func:`cached_targets` holds an exclusive lock on
``{cache}.lock`` while building, and a process that waited for it reuses what the holder wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from mindhier.data import ImageStore, caption_for, load_captions
from mindhier.errors import MindhierError
from mindhier.vision.base import VisionHierarchy

try:
    import fcntl
except ImportError:  # not POSIX: no lock; the atomic rename still keeps every cache whole
    fcntl = None

FORMAT_VERSION = 1
CAPTION_VARIANTS = 3  # the official code uses caption i % 3 of image i


class TargetCacheError(MindhierError, ValueError):
    """A target cache that is missing, stale, damaged, or lacks requested rows."""


def caption_policy(index: int) -> int:
    return index % CAPTION_VARIANTS


def cache_key(model: VisionHierarchy, layers, with_text: bool) -> dict:
    return {"format": FORMAT_VERSION, "model": model.identity(), "layers": [int(g) for g in layers],
            "text": "caption i%3" if with_text else None}


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def build_target_cache(model: VisionHierarchy, image_store: ImageStore, image_indices, captions,
                       layers, out_path, batch_size: int = 64, show_progress: bool = True) -> Path:
    """Compute and write the targets of ``image_indices`` (see module doc) to ``out_path``.

    ``captions`` is the (N, k) caption array or None (no text targets). Written to a temporary
    file and renamed at the end, so an interrupted build leaves nothing that looks complete.
    The temporary name is this builder's own: the pid alone can repeat across containers (PID
    namespaces) or hosts sharing the folder, and two writers of one file would corrupt it."""
    layers = model.check_layers(layers)
    indices = np.unique(np.asarray(image_indices, dtype=np.int64))
    key = cache_key(model, layers, captions is not None)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + f".{os.getpid()}.{secrets.token_hex(4)}.tmp")
    n, t, d = len(indices), model.num_tokens, model.feature_dim
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["key"] = json.dumps(key, sort_keys=True)
            f.attrs["layers"] = np.asarray(layers, dtype=np.int64)
            f.create_dataset("image_indices", data=indices)
            chunk = lambda *shape: (1, *shape)  # noqa: E731  one image per chunk: cheap random rows
            for g in layers:
                f.create_dataset(f"layer_{g}", (n, t, d), dtype="f2", chunks=chunk(t, d))
            f.create_dataset("final_embedding", (n, d), dtype="f2")
            if captions is not None:
                f.create_dataset("text", (n, model.text_tokens, model.text_dim), dtype="f2",
                                 chunks=chunk(model.text_tokens, model.text_dim))
                f.create_dataset("text_embedding", (n, d), dtype="f2")
            bar = tqdm(total=n, desc=f"targets {out_path.name}", disable=not show_progress, unit="img", dynamic_ncols=True)
            for start in range(0, n, batch_size):
                rows = slice(start, min(n, start + batch_size))
                batch = indices[rows]
                feats, final = model.image_targets(torch.from_numpy(image_store.get(batch)), layers)
                for g, v in zip(layers, feats):
                    f[f"layer_{g}"][rows] = v.cpu().numpy().astype(np.float16)
                f["final_embedding"][rows] = final.cpu().numpy().astype(np.float16)
                if captions is not None:
                    texts = [caption_for(captions, int(i), caption_policy(int(i))) for i in batch]
                    tokens, emb = model.text_targets(texts)
                    f["text"][rows] = tokens.cpu().numpy().astype(np.float16)
                    f["text_embedding"][rows] = emb.cpu().numpy().astype(np.float16)
                bar.update(len(batch))
            bar.close()
    except BaseException:  # an error or Ctrl-C midway: no partial file left in the cache folder
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out_path)
    return out_path


class TargetCache:
    """Read side of a target cache: ``rows_for(image_indices)`` -> dict of float32 tensors.

    Opens the file lazily per process (safe under DataLoader workers). ``in_memory=True`` reads
    everything once, for small worlds where that is faster than row reads."""

    def __init__(self, path, expect_key: dict | None = None, in_memory: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise TargetCacheError(f"{self.path}: target cache not found; build it with "
                                   "mindhier.vision.targets.cached_targets (train-encoder does this)")
        self._file, self._pid = None, None
        try:
            f = self._h5()
            self.key = json.loads(f.attrs["key"])
            self.layers = tuple(int(g) for g in f.attrs["layers"])
            self.image_indices = f["image_indices"][...]
            self.names = sorted(k for k in f.keys() if k != "image_indices")
        except (OSError, KeyError, json.JSONDecodeError) as err:
            raise TargetCacheError(f"{self.path}: not a complete target cache ({err}); delete it to rebuild") from err
        if expect_key is not None and self.key != expect_key:
            raise TargetCacheError(f"{self.path}: stale target cache: {_describe_difference(expect_key, self.key)}; "
                                   "delete it (or let cached_targets rebuild it)")
        self.row_of = {int(i): r for r, i in enumerate(self.image_indices)}
        self._memory = {name: f[name][...] for name in self.names} if in_memory else None

    @property
    def identity(self) -> dict:
        return self.key["model"]

    @property
    def has_text(self) -> bool:
        return "text" in self.names

    def __len__(self) -> int:
        return len(self.image_indices)

    def _h5(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file

    def rows_for(self, image_indices, names=None) -> dict[str, torch.Tensor]:
        """Targets of ``image_indices`` (any order, repeats allowed) as float32 tensors keyed by
        dataset name (``layer_{g}``, ``final_embedding``, ``text``, ``text_embedding``)."""
        wanted = np.atleast_1d(np.asarray(image_indices, dtype=np.int64))
        missing = [int(i) for i in wanted if int(i) not in self.row_of]
        if missing:
            raise TargetCacheError(f"{self.path}: no targets for images {missing[:5]}"
                                   f"{' …' if len(missing) > 5 else ''}; rebuild the cache for this image set")
        rows = np.array([self.row_of[int(i)] for i in wanted], dtype=np.int64)
        unique, inverse = np.unique(rows, return_inverse=True)  # h5py needs increasing rows
        out = {}
        for name in names or self.names:
            source = self._memory[name] if self._memory is not None else self._h5()[name]
            values = source[unique] if self._memory is not None else source[unique.tolist()]
            out[name] = torch.from_numpy(np.asarray(values, dtype=np.float32)[inverse])
        return out

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_pid": None}


def _describe_difference(expected: dict, found: dict) -> str:
    parts = [f"{k}: cache has {found.get(k)!r}, wanted {expected.get(k)!r}"
             for k in sorted(set(expected) | set(found)) if expected.get(k) != found.get(k)]
    return "; ".join(parts) or "keys differ"


def cache_path(model: VisionHierarchy, layers, cache_dir, with_text: bool = True, tag: str = "") -> Path:
    key = cache_key(model, model.check_layers(layers), with_text)
    layer_part = "-".join(str(g) for g in key["layers"])
    return Path(cache_dir) / f"targets_{model.identity()['name']}_L{layer_part}{tag}_{key_hash(key)}.h5"


def cached_targets(model: VisionHierarchy, data_root, layers, cache_dir, image_indices=None,
                   with_text: bool = True, batch_size: int = 64, in_memory: bool = False,
                   show_progress: bool = True) -> TargetCache:
    """The target cache for ``model`` + ``layers`` on ``data_root``'s images: reused when a
    matching file exists and covers ``image_indices`` (default: every image), built otherwise.
    Safe to call from several processes at once: one builds, the others wait and reuse it."""
    with ImageStore(data_root) as store:
        wanted = np.arange(store.num_images) if image_indices is None else np.unique(np.asarray(image_indices))
        tag = "" if image_indices is None else f"_n{len(wanted)}_{hashlib.sha256(wanted.tobytes()).hexdigest()[:8]}"
        path = cache_path(model, layers, cache_dir, with_text, tag)
        key = cache_key(model, model.check_layers(layers), with_text)
        cache = _reusable(path, key, wanted, in_memory)  # no lock needed to read: files appear whole
        if cache is not None:
            return cache
        with _build_lock(path, show_progress):
            cache = _reusable(path, key, wanted, in_memory)  # again: the lock's last holder may have built it
            if cache is not None:
                return cache
            captions = load_captions(data_root) if with_text else None
            build_target_cache(model, store, wanted, captions, layers, path, batch_size=batch_size,
                               show_progress=show_progress)
    return TargetCache(path, expect_key=key, in_memory=in_memory)


def _reusable(path: Path, key: dict, wanted: np.ndarray, in_memory: bool) -> TargetCache | None:
    """The cache at ``path`` if it matches ``key`` and holds every ``wanted`` image, else None."""
    if not path.is_file():
        return None
    try:
        cache = TargetCache(path, expect_key=key, in_memory=in_memory)
    except TargetCacheError:
        return None  # damaged or stale under a colliding name: the caller rebuilds it
    if np.isin(wanted, cache.image_indices).all():
        return cache
    cache.close()
    return None


@contextmanager
def _build_lock(path: Path, show_progress: bool):
    """Holds an exclusive flock on ``{path}.lock``. The OS releases it when its holder exits, so
    a killed build never leaves the cache locked. The lock file itself stays: deleting it would
    let a newcomer lock a fresh file while a waiter still holds the old one."""
    if fcntl is None:
        yield
        return
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:  # closing it releases the lock
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if show_progress:
                print(f"[mindhier] {path.name}: another process is building it; waiting to reuse it",
                      file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield
