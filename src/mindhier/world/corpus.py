"""The pretraining corpus: the demo's stand-in for LAION / OpenImages (SPEC §1.4).

MindHier's vision model, tokenizer and generator are foundation models that saw far more images
than NSD; the demo's small ones must too, or they learn colours and not things from the fMRI
world's 3,000 images. The corpus is the world's own scene sampler, renderer and captioner run on
a **separate seed stream** (``STREAM_CORPUS``; the fMRI world draws from ``STREAM_SCENES``), so
corpus image ``i`` is ``default_rng([seed, STREAM_CORPUS, i])`` and no corpus image is an fMRI
image (checked by :func:`overlap_with_world` on pixel hashes). It has no fMRI.

Written compactly in NSD's own stimulus layout, so every image reader of the toolkit reads it::

    nsd_stimuli.hdf5              dataset "imgBrick": (N, H, W, 3) uint8 (12 KB an image at 64 px)
    COCO_73k_annots_curated.npy   (N, 5) captions (4 paraphrases + '')
    corpus/labels.npz             scene labels for the world reader (see ``scene_labels``)
    corpus/corpus.json            seed, size, format, digest — written last: marks a complete corpus

Rendering runs at ≈ 95 images/s per core at 64 px (measured on this project's 2-core machine),
so 100 k images take ≈ 9 min with two workers. An interrupted write resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import time
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from mindhier.config import get_preset, to_dict
from mindhier.data import layout
from mindhier.errors import MindhierError
from mindhier.world.images import (BACKGROUNDS, CATEGORIES, COLOUR_NAMES, SceneSpec, caption_array, render_scene,
                                   sample_scene)

CORPUS_FORMAT = 1
STREAM_CORPUS = 1  # second word of a corpus scene's rng seed list; the fMRI world uses 0
CHUNK = 1000  # images rendered per worker task and written per HDF5 append
HOLD_OUT_EVERY = 50  # every 50th corpus image is held out by every model trained on the corpus


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    size: int = 100_000  # images
    image_size: int = 64  # must equal the fMRI world's (the foundation models see both)
    seed: int = 0


PRESETS: dict[str, CorpusConfig] = {
    "tiny": CorpusConfig(size=600, image_size=32),  # tests: a few seconds
    "demo": CorpusConfig(size=100_000, image_size=64),  # the released foundation models' corpus
}


def corpus_preset(name: str) -> CorpusConfig:
    return get_preset(PRESETS, name, "corpus")


class CorpusError(MindhierError):
    pass


corpus_info_path, labels_path = layout.corpus_info_path, layout.corpus_labels_path


def held_out_images(num_images: int) -> np.ndarray:
    """The corpus images no foundation model trains on (2 %): their held-out checks."""
    return np.arange(0, num_images, HOLD_OUT_EVERY)


def corpus_scene(seed: int, index: int) -> SceneSpec:
    return sample_scene(np.random.default_rng([seed, STREAM_CORPUS, index]))


# ---------------------------------------------------------------- labels

def main_cell(scene: SceneSpec) -> int:
    """3×3 cell (row-major, 0 = top left) of the main object's centre."""
    o = scene.objects[0]
    return int(min(2, int(o.y * 3)) * 3 + min(2, int(o.x * 3)))


def scene_labels(scenes: list[SceneSpec]) -> dict[str, np.ndarray]:
    """What the world reader learns to read, as integer arrays (one row per scene):
    main object's category, colour and 3×3 cell; background kind and colour; and the
    categories present (N, 12) 0/1."""
    present = np.zeros((len(scenes), len(CATEGORIES)), dtype=np.uint8)
    for i, s in enumerate(scenes):
        present[i, [CATEGORIES.index(o.category) for o in s.objects]] = 1
    return {
        "main_category": np.array([CATEGORIES.index(s.objects[0].category) for s in scenes], dtype=np.int64),
        "main_colour": np.array([COLOUR_NAMES.index(s.objects[0].colour) for s in scenes], dtype=np.int64),
        "main_cell": np.array([main_cell(s) for s in scenes], dtype=np.int64),
        "background_kind": np.array([BACKGROUNDS.index(s.background.kind) for s in scenes], dtype=np.int64),
        "background_colour": np.array([COLOUR_NAMES.index(s.background.colour) for s in scenes], dtype=np.int64),
        "present": present,
    }


def held_out_image_indices(root) -> np.ndarray:
    """The held-out images: world.json's ``test_images``, a corpus's every 50th image, else
    every subject's test images."""
    from mindhier.data import DataError, SubjectIndex

    root = Path(root)
    if is_corpus(root):
        return held_out_images(read_corpus_info(root)["config"]["size"])
    info = layout.world_info_path(root)
    if info.is_file():
        world = json.loads(info.read_text())
        listed = world.get("test_images", world.get("test_image_indices"))
        if listed is not None:
            return np.unique(np.asarray(listed, dtype=np.int64))
    found = [SubjectIndex(root, s, check_betas=False).test_images for s in layout.subjects_in(root)]
    if not found:
        raise DataError(f"{root}: cannot tell the test images apart (no world/world.json with "
                        "'test_images' and no subject tars); create the data with `mindhier world`")
    return np.unique(np.concatenate(found))


def world_labels(root) -> dict[str, np.ndarray]:
    """``scene_labels`` of a synthetic world's images (from world/image_params.json)."""
    path = layout.image_params_path(root)
    if not path.is_file():
        raise CorpusError(f"{path} not found: scene labels exist only for a synthetic world "
                          "(`mindhier world`) or a corpus (`mindhier corpus`)")
    scenes = [SceneSpec.from_dict(d) for d in json.loads(path.read_text())["images"]]
    return scene_labels(scenes)


def load_labels(root) -> dict[str, np.ndarray]:
    """Scene labels of a corpus (corpus/labels.npz) or of a world."""
    if labels_path(root).is_file():
        with np.load(labels_path(root), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    return world_labels(root)


# ---------------------------------------------------------------- writing

def _render_chunk(job: tuple[int, int, int, int]) -> tuple[int, np.ndarray, np.ndarray, dict]:
    seed, start, stop, size = job
    scenes = [corpus_scene(seed, i) for i in range(start, stop)]
    images = np.empty((len(scenes), size, size, 3), dtype=np.uint8)
    for k, scene in enumerate(scenes):
        image, _ = render_scene(scene, size, grid=size // 4)
        images[k] = np.round(image * 255).astype(np.uint8)
    return start, images, caption_array(scenes), scene_labels(scenes)


def _digest(images: np.ndarray) -> str:
    return hashlib.sha256(images.tobytes()).hexdigest()


def write_corpus(cfg: CorpusConfig, out, *, workers: int = 2, force: bool = False, show_progress: bool = True) -> Path:
    """Render the corpus into ``out`` (resuming an interrupted write) and return ``out``.

    Refuses a folder holding anything else than a corpus of this config unless ``force``."""
    out = Path(out)
    _prepare(out, cfg, force)
    h5_path = layout.stimuli_hdf5_path(out)
    started = time.perf_counter()
    with h5py.File(h5_path, "a") as f:
        if layout.NSD_STIMULI_DATASET not in f:
            f.create_dataset(layout.NSD_STIMULI_DATASET, shape=(cfg.size, cfg.image_size, cfg.image_size, 3),
                             dtype=np.uint8, chunks=(min(64, cfg.size), cfg.image_size, cfg.image_size, 3))
            f.attrs["rows_done"] = 0
            f.attrs["config"] = json.dumps(to_dict(cfg))
        ds, done = f[layout.NSD_STIMULI_DATASET], int(f.attrs["rows_done"])
        labels = _partial_labels(out, done)
        jobs = [(cfg.seed, s, min(s + CHUNK, cfg.size), cfg.image_size) for s in range(done, cfg.size, CHUNK)]
        bar = tqdm(total=cfg.size, initial=done, desc="corpus", unit="img", disable=not show_progress,
                   dynamic_ncols=True)
        with multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else _Serial() as pool:
            for start, images, caps, lab in pool.imap(_render_chunk, jobs):  # in order: rows_done stays exact
                ds[start: start + len(images)] = images
                np.save(out / "corpus" / f"captions_{start:08d}.npy", caps, allow_pickle=False)
                for k, v in lab.items():
                    labels.setdefault(k, []).append(v)
                _save_partial_labels(out, labels)
                f.attrs["rows_done"] = start + len(images)
                f.flush()
                bar.update(len(images))
        bar.close()
    _finish(out, cfg, labels, time.perf_counter() - started)
    return out


class _Serial:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap(fn, jobs):
        return map(fn, jobs)


def _prepare(out: Path, cfg: CorpusConfig, force: bool) -> None:
    info = corpus_info_path(out)
    h5_path = layout.stimuli_hdf5_path(out)
    if info.is_file() and not force:
        found = json.loads(info.read_text())
        if found.get("config") == to_dict(cfg):
            raise CorpusError(f"{out} already holds this corpus ({info}); nothing to do. Use it as --data, "
                              "or pass --force to write it again")
        raise CorpusError(f"{out} holds another corpus ({found.get('config')}); choose another --out or pass --force")
    if h5_path.is_file() and not force:
        with h5py.File(h5_path, "r") as f:
            same = f.attrs.get("config") == json.dumps(to_dict(cfg))
        if not same:
            raise CorpusError(f"{h5_path} is from another corpus config or not a corpus; pass --force to replace it")
        return  # an interrupted write of this corpus: resume it
    if out.exists() and not out.is_dir():
        raise CorpusError(f"{out} is a file; choose a folder (--out)")
    if out.exists() and any(p.name not in ("corpus", h5_path.name, layout.captions_path(out).name)
                            for p in out.iterdir()):
        raise CorpusError(f"{out} holds other files; choose an empty or new folder for the corpus")
    if force:
        for p in (h5_path, layout.captions_path(out), info, labels_path(out)):
            p.unlink(missing_ok=True)
        for p in (out / "corpus").glob("*.npy"):
            p.unlink()
    (out / "corpus").mkdir(parents=True, exist_ok=True)


def _partial_labels(out: Path, done: int) -> dict[str, list]:
    path = out / "corpus" / "labels_partial.npz"
    if done == 0 or not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as z:
        return {k: [z[k][:done]] for k in z.files}


def _save_partial_labels(out: Path, labels: dict[str, list]) -> None:
    tmp = out / "corpus" / "labels_partial.tmp.npz"
    np.savez(tmp, **{k: np.concatenate(v) for k, v in labels.items()})
    tmp.replace(out / "corpus" / "labels_partial.npz")


def _finish(out: Path, cfg: CorpusConfig, labels: dict[str, list], seconds: float) -> None:
    parts = sorted((out / "corpus").glob("captions_*.npy"))
    caps = np.concatenate([np.load(p, allow_pickle=False) for p in parts])
    if len(caps) != cfg.size:
        raise CorpusError(f"{out}: {len(caps)} caption rows for {cfg.size} images; rerun with --force")
    np.save(layout.captions_path(out), caps, allow_pickle=False)
    np.savez(labels_path(out), **{k: np.concatenate(v) for k, v in labels.items()})
    for p in parts:
        p.unlink()
    (out / "corpus" / "labels_partial.npz").unlink(missing_ok=True)
    with h5py.File(layout.stimuli_hdf5_path(out), "r") as f:
        digest = hashlib.sha256()
        ds = f[layout.NSD_STIMULI_DATASET]
        for s in range(0, cfg.size, 10_000):
            digest.update(ds[s: s + 10_000].tobytes())
    corpus_info_path(out).write_text(json.dumps({
        "format": CORPUS_FORMAT, "config": to_dict(cfg), "stream": STREAM_CORPUS,
        "images_sha256": digest.hexdigest(), "seconds": round(seconds, 1),
        "categories": list(CATEGORIES), "colours": list(COLOUR_NAMES), "backgrounds": list(BACKGROUNDS),
    }, indent=1) + "\n")


def read_corpus_info(root) -> dict:
    path = corpus_info_path(root)
    if not path.is_file():
        raise CorpusError(f"{path} not found: {root} is not a complete corpus (write one with "
                          f"`mindhier corpus --out {root}`; an interrupted write resumes)")
    return json.loads(path.read_text())


def is_corpus(root) -> bool:
    return corpus_info_path(root).is_file()


# ---------------------------------------------------------------- disjointness

def pixel_hashes(images: np.ndarray) -> set[bytes]:
    """One 16-byte hash per uint8 image (N, ...)."""
    return {hashlib.blake2b(im.tobytes(), digest_size=16).digest() for im in images}


def overlap_with_world(corpus_root, world_root, batch: int = 10_000) -> dict:
    """How many corpus images are pixel-identical to an fMRI-world image (after the same uint8
    rounding), and how many share a world image's scene parameters. Both must be 0."""
    from mindhier.data import ImageStore

    world = ImageStore(world_root)
    world_u8 = np.round(world.get(np.arange(world.num_images)) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    world.close()
    world_hashes = pixel_hashes(world_u8)
    world_scenes = {json.dumps(d["background"], sort_keys=True) + json.dumps(d["objects"], sort_keys=True)
                    for d in json.loads(layout.image_params_path(world_root).read_text())["images"]}
    info = read_corpus_info(corpus_root)
    cfg = CorpusConfig(**info["config"])
    same_pixels = 0
    with h5py.File(layout.stimuli_hdf5_path(corpus_root), "r") as f:
        ds = f[layout.NSD_STIMULI_DATASET]
        for s in range(0, len(ds), batch):
            same_pixels += len(pixel_hashes(ds[s: s + batch]) & world_hashes)
    same_scenes = 0
    for i in range(cfg.size):
        d = corpus_scene(cfg.seed, i).to_dict()
        same_scenes += (json.dumps(d["background"], sort_keys=True) + json.dumps(d["objects"], sort_keys=True)) in world_scenes
    return {"corpus_images": cfg.size, "world_images": int(len(world_u8)),
            "pixel_identical": int(same_pixels), "same_scene_parameters": int(same_scenes)}
