"""`mindhier` command line: one subcommand per job, each living in its own module.

Every command module defines ``add_arguments(parser)`` and ``run(args) -> int``; they are
imported only when their command runs, so `mindhier --help` is quick.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mindhier.errors import MindhierError

# name -> (module, one-line help). Order is the order a new user meets them.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("mindhier.demo", "the whole offline pipeline on the synthetic world, with an HTML report"),
    "pretrain": ("mindhier.pretrain", "train (or resume) the demo's foundation models on the pretraining corpus"),
    "world": ("mindhier.world.cli", "generate the synthetic world (images, captions, simulated cortex) in NSD layout"),
    "corpus": ("mindhier.world.corpus_cli", "write the pretraining corpus (scenes without fMRI) for the foundation models"),
    "data-info": ("mindhier.data.cli", "summarise a data folder in MindEye2 layout (subjects, voxels, trials)"),
    "prepare-nsd": ("mindhier.data.prepare_nsd", "convert raw NSD (NIfTI betas, expdesign) to the MindEye2 layout"),
    "train-vision": ("mindhier.train.vision", "train the in-project small CLIP on a world's image-caption pairs"),
    "eval-foundation": ("mindhier.world.foundation_eval", "what the foundation models show on a world's test stimuli (reader rates)"),
    "ablation-check": ("mindhier.ablation_check", "does the released pipeline beat its sampling-time ablations by more than seed noise"),
    "probe-vision": ("mindhier.vision.probes", "what each vision layer carries: linear probes on a world's stimuli"),
    "train-reader": ("mindhier.train.reader", "train the world reader (reads scene parameters from pictures) on the corpus"),
    "train-encoder": ("mindhier.train.encoder", "stage 1: train the hierarchical fMRI encoder"),
    "train-tokenizer": ("mindhier.train.tokenizer", "train the multi-scale residual VQ-VAE"),
    "import-tokenizer": ("mindhier.tokenizer.cli", "turn released VAR/Switti VQ-VAE weights into a mindhier checkpoint"),
    "train-generator": ("mindhier.train.generator", "stage 2: train the scale-aware generator"),
    "pretrain-generator": ("mindhier.train.pretrain_generator", "pretrain the generator on the corpus, conditioned on each image's vision features"),
    "train-lowlevel": ("mindhier.train.lowlevel", "MindHier†: train the low-level decoder (blurry images blended into reconstructions)"),
    "reconstruct": ("mindhier.reconstruct", "reconstruct test images from fMRI"),
    "evaluate": ("mindhier.evaluate", "score reconstructions against their stimuli (MindEye2 metrics)"),
    "report": ("mindhier.run_report", "HTML report of reconstructions and their scores (reconstruct + evaluate outputs)"),
    "interpret": ("mindhier.interpret", "which encoder block predicts which visual area (appendix D), per voxel and area"),
    "interpret-summary": ("mindhier.interpret_summary", "interpret over subjects, seeds and supervision: does the hierarchy hold"),
    "curves": ("mindhier.curves", "draw a training run's curves (loss, lr, grad norm, held-out) from its log.jsonl"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every command's --help: its module doc as written, then each flag with its real default
    (not the None of optional flags, nor the False of switches)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mindhier",
        description=(
            "Reconstruct seen images from fMRI (MindHier). Start with `mindhier demo`; every "
            "command takes --help. Multi-process training: `torchrun --nproc_per_node=N -m "
            "mindhier train-...`."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            print(f"mindhier {name}: not available in this version ({module_name} missing)", file=sys.stderr)
            return 2
        raise
    cmd = argparse.ArgumentParser(prog=f"mindhier {name}", description=getattr(module, "__doc__", None) or help_text,
                                  formatter_class=HelpFormatter)
    module.add_arguments(cmd)
    args = cmd.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except MindhierError as err:
        print(f"mindhier {name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
