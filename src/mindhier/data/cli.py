"""Summarise a data folder in the MindEye2 layout and report what is wrong with it.

Shows, per subject: voxels, sessions, training trials and unique images, test images and
their repetitions; plus the image file, captions, and whether the folder is a synthetic world.
Betas values (NaN/inf, scale) are checked on an evenly spaced sample of rows by default and on
every row with ``--full``. Exit status 0 when nothing is wrong, 1 when problems were found.

  mindhier data-info data/world            # every subject with a betas file
  mindhier data-info /data/nsd --subject 1 --full
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from mindhier.data import layout
from mindhier.data.datasets import TEST_REPETITIONS, SubjectIndex
from mindhier.data.manifest import world_summary
from mindhier.data.readers import BetasFile, DataError, ImageStore, load_captions
from mindhier.data.stimuli import NSD_STIMULUS_SIZE, open_largest
from mindhier.data.values import sample_rows, scale_problem, scan_values


def summarize(root: str | Path, subjects=None, full: bool = False) -> dict:
    """Facts and problems of a data folder, as plain data (the command prints it)."""
    root = Path(root)
    info = {"root": str(root), "problems": [], "notes": [], "subjects": {}}
    if not root.is_dir():
        info["problems"].append(f"{root}: folder not found")
        return info
    info["world"] = _guard(info, lambda: world_summary(root))
    store = _guard(info, lambda: ImageStore(root))
    if store is not None:
        info["images"] = {"file": str(store.path.relative_to(root)), "count": store.num_images, "size": store.image_size}
        _guard(info, lambda: store.get([0, store.num_images - 1]))  # value range check on two images
        _stimuli_note(root, store, info)
    info["captions"] = _guard(info, lambda: load_captions(root).shape)
    subjects = layout.subjects_in(root) if subjects is None else [int(s) for s in subjects]
    if not subjects:
        info["problems"].append(f"{root}: no betas_all_subjXX_fp32_renorm.hdf5 files — not a MindEye2-layout folder")
    for s in subjects:
        info["subjects"][s] = _subject_summary(root, s, store, full, info)
    return info


def _stimuli_note(root: Path, store: ImageStore, info: dict) -> None:
    """Stage 2 reads the largest stimuli (mindhier.data.stimuli): say which, or that real data lacks them."""
    largest = _guard(info, lambda: open_largest(root))
    if largest is None:
        return
    h, w = largest.image_size
    synthetic = info.get("world") or layout.corpus_info_path(root).is_file()
    if largest.path != store.path:
        info["notes"].append(f"train-generator trains on the largest stimuli, {largest.path.name} ({h}×{w} px)")
    elif not synthetic and min(h, w) < NSD_STIMULUS_SIZE:
        info["notes"].append(f"the largest stimuli here are {h}×{w} px: a larger generator (512 px in the paper) "
                             "needs NSD's nsd_stimuli.hdf5 in this folder (`mindhier prepare-nsd` links it)")
    if largest is not store:
        largest.close()


def _guard(info: dict, fn):
    """Run one check; a DataError becomes a listed problem instead of ending the summary."""
    try:
        return fn()
    except DataError as err:
        info["problems"].append(str(err))
        return None


def _subject_summary(root: Path, subject: int, store: ImageStore | None, full: bool, info: dict) -> dict:
    out = {}
    betas = _guard(info, lambda: BetasFile(root, subject))
    if betas is None:
        return out
    out.update(voxels=betas.num_voxels, rows=betas.num_trials)
    index = _guard(info, lambda: SubjectIndex(root, subject, images=store))
    if index is not None:
        shown = Counter(Counter(index.test.image.tolist()).values())
        out.update(sessions=len(index.sessions), train_trials=len(index.train),
                   train_images=len(np.unique(index.train.image)), test_trials=len(index.test),
                   test_images=len(index.test_images), test_showings=dict(sorted(shown.items())))
        few = sum(n for reps, n in shown.items() if reps < TEST_REPETITIONS)
        if few:
            info["notes"].append(f"subject {subject}: {few} test images have fewer than {TEST_REPETITIONS} "
                                    "repetitions (they are repeated to 3, SPEC §1.1)")
    roi = layout.roi_path(root, subject)
    if roi.is_file():
        labels = np.load(roi, allow_pickle=False)
        out["roi"] = {name: int((labels == k).sum()) for k, name in enumerate(layout.ROI_NAMES)}
    # NaN/inf and scale: without --full on a bounded sample, so the default stays fast on 2 GB files
    rows = None if full else sample_rows(betas.num_trials)
    out["values"] = _guard(info, lambda: scan_values(betas, rows))
    if out["values"]:
        out["values"]["sample"] = not full
        problem = scale_problem(out["values"], betas.path)
        if problem:
            info["problems"].append(problem)
    betas.close()
    return out


def _format_values(v: dict) -> str:
    scope = (f"a sample of {v['rows_read']} of {v['rows']} rows (evenly spaced; --full reads every row)"
             if v["sample"] else f"all {v['rows_read']} rows")
    return (f"\n      betas mean {v['mean']:.3f}, std {v['std']:.3f}, median per-voxel std {v['voxel_std']:.3g}, "
            f"range {v['min']:.4g}..{v['max']:.4g}; no NaN/inf in {scope}")


def format_summary(info: dict) -> str:
    lines = [f"data folder: {info['root']}"]
    world = info.get("world")
    lines.append(f"  synthetic world: preset {world.get('preset') or '(custom config)'}, seed {world.get('seed')}" if world
                 else "  not a synthetic world (no world/world.json): real or externally prepared data")
    if info.get("images"):
        im = info["images"]
        lines.append(f"  images: {im['file']} — {im['count']} images, 3×{im['size'][0]}×{im['size'][1]}")
    if info.get("captions"):
        n, k = info["captions"]
        lines.append(f"  captions: {n} images × {k} captions")
    for s, sub in info["subjects"].items():
        if not sub:
            lines.append(f"  {layout.subj_name(s)}: unreadable (see problems)")
            continue
        nsd = layout.NSD_VOXELS.get(s)
        line = f"  {layout.subj_name(s)}: {sub['voxels']} voxels" + (f" (NSD nsdgeneral: {nsd})" if nsd else "")
        line += f", {sub['rows']} betas rows"
        if "sessions" in sub:
            reps = ", ".join(f"{n} images ×{r}" for r, n in sub["test_showings"].items())
            line += (f"\n      {sub['sessions']} sessions, {sub['train_trials']} training trials on "
                     f"{sub['train_images']} unique images; test: {sub['test_images']} images ({reps})")
        if "roi" in sub:
            line += "\n      ROI voxels: " + ", ".join(f"{k} {v}" for k, v in sub["roi"].items())
        if sub.get("values"):
            line += _format_values(sub["values"])
        lines.append(line)
    lines += [f"  note: {n}" for n in info["notes"]]
    if info["problems"]:
        lines.append("problems:")
        lines += [f"  - {p}" for p in info["problems"]]
    else:
        lines.append("no problems found")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("root", type=Path, metavar="DIR", help="data folder (MindEye2 layout or a synthetic world)")
    parser.add_argument("--subject", type=int, nargs="+", default=None, help="subjects to check (default: all with a betas file)")
    parser.add_argument("--full", action="store_true", help="check every betas row for NaN/inf and scale (default: an evenly spaced sample); slow on real NSD")


def run(args) -> int:
    info = summarize(args.root, args.subject, full=args.full)
    print(format_summary(info))
    return 1 if info["problems"] else 0
