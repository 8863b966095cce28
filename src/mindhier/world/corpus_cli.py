"""Write the pretraining corpus (SPEC §1.4): the world's scenes on their own seed stream, no fMRI.

  mindhier corpus                                   # demo preset: 100,000 images into corpora/demo
  mindhier corpus --preset tiny --out corpora/tiny
  mindhier corpus --check-against worlds/demo       # prove no corpus image is an fMRI image

The corpus is what the demo's foundation models (small CLIP, tokenizer, pretrained generator,
world reader) train on, as CLIP, VQVAE-Switti and Switti trained on web-scale images before
MindHier saw NSD. An interrupted write resumes when the same command is run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from mindhier.world.corpus import PRESETS, corpus_preset


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="corpus size")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: corpora/PRESET)")
    p.add_argument("--size", type=int, default=None, help="number of images (default: the preset's)")
    p.add_argument("--seed", type=int, default=None, help="corpus seed (default: the preset's, 0)")
    p.add_argument("--workers", type=int, default=2, help="rendering processes")
    p.add_argument("--force", action="store_true", help="replace a corpus already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--check-against", type=Path, default=None, metavar="WORLD",
                   help="after writing (or for an existing corpus), count corpus images identical to "
                        "WORLD's images or scene parameters and write OUT/corpus/overlap.json")


def run(args: argparse.Namespace) -> int:
    from mindhier.world.corpus import CorpusError, is_corpus, overlap_with_world, write_corpus

    cfg = corpus_preset(args.preset)
    changes = {k: v for k, v in (("size", args.size), ("seed", args.seed)) if v is not None}
    cfg = dataclasses.replace(cfg, **changes)
    out = args.out if args.out is not None else Path("corpora") / args.preset
    if not (args.check_against is not None and is_corpus(out) and not args.force):
        write_corpus(cfg, out, workers=args.workers, force=args.force, show_progress=not args.quiet)
        print(f"corpus of {cfg.size} images ({cfg.image_size} px, seed {cfg.seed}) written to {out}")
    if args.check_against is not None:
        result = overlap_with_world(out, args.check_against)
        (out / "corpus" / "overlap.json").write_text(json.dumps({"world": str(args.check_against), **result}, indent=1))
        print(f"overlap with {args.check_against}: {result}")
        if result["pixel_identical"] or result["same_scene_parameters"]:
            raise CorpusError(f"{out} shares images with {args.check_against}: {result}")
    return 0
