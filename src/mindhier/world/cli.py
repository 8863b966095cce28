"""Generate the synthetic world (SPEC §1.3), or report how informative a world's cortex is.

  mindhier world                          # demo preset into worlds/demo
  mindhier world --preset tiny --out worlds/tiny --seed 3
  mindhier world --report worlds/demo --subject 1

The world is written in NSD's MindEye2 layout (betas HDF5, webdataset tars, images HDF5,
captions .npy) plus world/ (ROI labels, image parameters, world.json). The report measures
split-half reliability per ROI, ridge decoding of the main object's category and of the
pixels on held-out test images, and writes DIR/world/report.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mindhier.world.config import PRESETS, world_preset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                        help="world size: tiny (CI, seconds), demo (~1-2 min), large (NSD-sized design)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: worlds/PRESET)")
    parser.add_argument("--seed", type=int, default=None, help="world seed (default: the preset's, 0)")
    parser.add_argument("--force", action="store_true", help="replace the world files in a non-empty --out (other files there are kept)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--report", type=Path, default=None, metavar="DIR",
                        help="instead of generating, measure the world in DIR and write DIR/world/report.json")
    parser.add_argument("--subject", type=int, action="append", default=None,
                        help="with --report: subject(s) to measure (repeatable; default: all)")


def run(args: argparse.Namespace) -> int:
    if args.report is not None:
        return _report(args)
    from mindhier.world.generate import generate_world

    cfg = world_preset(args.preset)
    out = args.out if args.out is not None else Path("worlds") / args.preset
    started = time.perf_counter()
    generate_world(cfg, out, seed=args.seed, force=args.force, show_progress=not args.quiet)
    print_summary(out, time.perf_counter() - started)
    print(f"next: mindhier world --report {out}")
    return 0


def print_summary(out: Path, seconds: float | None = None) -> None:
    """What a world holds, one line per subject."""
    from mindhier.world.generate import read_world_info

    info = read_world_info(out)
    took = f", {seconds:.0f} s" if seconds is not None else ""
    print(f"world '{info['preset']}' (seed {info['seed']}) in {out}: {info['n_images']} images of "
          f"{info['image_size']}x{info['image_size']} ({info['n_train_images']} train, {info['n_test_images']} test), "
          f"{len(info['categories'])} categories{took}")
    for s in info["subjects"]:
        rois = ", ".join(f"{n} {v}" for n, v in s["roi_voxels"].items())
        print(f"  subj{s['subject']:02d}: {s['voxels']} voxels ({rois}), {s['trials']} trials in "
              f"{s['sessions']} sessions of <= {info['trials_per_session']}, {s['test_trials']} test trials")


def _report(args: argparse.Namespace) -> int:
    from mindhier.world.report import format_report, world_report

    report = world_report(args.report, args.subject)
    print(format_report(report))
    print(f"written to {args.report / 'world' / 'report.json'}")
    return 0
