"""A fingerprint of the data a model was trained on, saved in every checkpoint.

``data_manifest(root)`` lists each relevant file of the layout (relative path, size, content
hash) plus the synthetic world's seed and preset, so a later run can tell whether it sees the
same data. It is deterministic: no absolute paths, no times, sorted keys. Files under 64 MiB
are hashed whole; larger ones (a real subject's betas are ~2 GB) by their first and last
8 MiB plus the size, which catches truncation, regeneration and swapped files in seconds.
``full=True`` hashes every file whole (seconds per GB), where a change in the middle of a large
file must be caught too: the released checkpoints' regression record uses it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mindhier.data import layout
from mindhier.data.readers import DataError

FULL_HASH_LIMIT = 64 * 2**20
EDGE_BYTES = 8 * 2**20
MANIFEST_VERSION = 1


def file_fingerprint(path: Path, full: bool = False) -> dict:
    """{size, sha256, scope}: scope "full" (whole file) or "edges" (first + last 8 MiB + size)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if full or size < FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(2**20), b""):
                h.update(block)
            return {"size": size, "sha256": h.hexdigest(), "scope": "full"}
        h.update(f.read(EDGE_BYTES))
        f.seek(size - EDGE_BYTES)
        h.update(f.read(EDGE_BYTES))
        h.update(str(size).encode())
    return {"size": size, "sha256": h.hexdigest(), "scope": "edges"}


def _png_folder_fingerprint(folder: Path) -> dict:
    """The PNG folder can hold 73,000 files: fingerprint names and sizes, not contents."""
    h = hashlib.sha256()
    files = sorted(folder.glob("image_*.png"))
    for p in files:
        h.update(f"{p.name}:{p.stat().st_size}\n".encode())
    return {"count": len(files), "sha256": h.hexdigest(), "scope": "names+sizes"}


def relevant_files(root: Path, subjects: list[int]) -> list[Path]:
    """Files whose content a trained model depends on, in a fixed order."""
    files = []
    for s in subjects:
        files.append(layout.betas_path(root, s))
        files += sorted(layout.wds_dir(root, s).glob("train/*.tar"))
        files.append(layout.test_tar_path(root, s))
        files.append(layout.roi_path(root, s))
    files += [layout.images_hdf5_path(root), layout.stimuli_hdf5_path(root), layout.captions_path(root),
              layout.image_params_path(root), layout.world_info_path(root), layout.corpus_info_path(root)]
    return [p for p in files if p.is_file()]


def world_summary(root: Path) -> dict | None:
    """Seed and preset of a synthetic world (``world/world.json``), None for real data."""
    path = layout.world_info_path(root)
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not readable JSON ({err}); regenerate the world with `mindhier world`.") from None
    config = info.get("config") if isinstance(info.get("config"), dict) else {}
    return {key: info.get(key, config.get(key)) for key in ("seed", "preset")}


def data_manifest(root: str | Path, subjects=None, full: bool = False, sessions=None) -> dict:
    """Fingerprint of the data under ``root`` for ``subjects`` (default: all with betas);
    ``full``: every file hashed whole, however large; ``sessions``: the (1-based) sessions a run
    trains on, recorded as such (every train tar is fingerprinted whichever are used)."""
    root = Path(root)
    subjects = sorted(int(s) for s in (layout.subjects_in(root) if subjects is None else subjects))
    files = {p.relative_to(root).as_posix(): file_fingerprint(p, full) for p in relevant_files(root, subjects)}
    folder = layout.images_dir(root)
    if folder.is_dir():
        files[folder.relative_to(root).as_posix() + "/"] = _png_folder_fingerprint(folder)
    manifest = {"version": MANIFEST_VERSION, "subjects": subjects, "files": dict(sorted(files.items())),
                "world": world_summary(root)}
    if sessions is not None:
        manifest["sessions"] = [int(s) for s in sessions]
    return manifest


def diff_manifests(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between a checkpoint's manifest and today's data; empty
    when they match. Files only in ``current`` (e.g. an extra subject) are not differences;
    sessions are compared when both record them."""
    problems = []
    if None not in (saved.get("sessions"), current.get("sessions")) and saved["sessions"] != current["sessions"]:
        problems.append(f"sessions differ: saved {saved['sessions']}, now {current['sessions']}")
    if saved.get("world") != current.get("world"):
        problems.append(f"synthetic world differs: saved {saved.get('world')}, now {current.get('world')}")
    for name, fp in saved.get("files", {}).items():
        now = current.get("files", {}).get(name)
        if now is None:
            problems.append(f"{name}: missing now")
        elif now != fp:
            problems.append(f"{name}: content differs (saved size {fp.get('size', fp.get('count'))}, "
                            f"now {now.get('size', now.get('count'))})")
    return problems
