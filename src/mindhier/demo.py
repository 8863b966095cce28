"""`mindhier demo`: the whole pipeline, offline, on the synthetic world, ending in a report.

As in the paper, the vision model and the tokenizer are frozen foundation models and the
generator starts from a pretrained one (CLIP ViT-L/14, VQVAE-Switti and Switti there; the
models `mindhier pretrain` trains on the pretraining corpus here, released in
``checkpoints/foundation``). Only the fMRI stages are the demo's own: the stage-1 encoder,
aligned to the frozen vision model, and the stage-2 generator, fine-tuned from the pretrained
one on the encoder's outputs.

By default the demo uses the checkpoints this project releases (``checkpoints/demo`` beside
``checkpoints/foundation``): it checks that they match the code's configs, generates the
world, reconstructs the held-out test images, evaluates and writes an HTML report — a few
minutes on a laptop CPU. ``--from-scratch`` trains the fMRI stages itself from the released
foundation models, reusing any stage whose output already exists with a matching command and
inputs; ``--from-scratch --rebuild-foundation`` first re-creates the foundation models too
(`mindhier pretrain`: hours on a CPU).

Every stage runs the very command a user would type (printed as it starts), so the demo
doubles as a walk-through of the toolkit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


from mindhier.checkpoint import paths_for, read_metadata
from mindhier.errors import MindhierError
from mindhier.world.cli import print_summary

STAGES = ("encoder", "generator")             # what the demo trains, on fMRI
FOUNDATION = ("vision", "tokenizer", "generator")  # what it takes from `mindhier pretrain`
ROLES = ("vision", "encoder", "tokenizer", "generator")  # the checkpoints a reconstruction uses
DEFAULT_FOUNDATION = "checkpoints/foundation"
DEFAULT_READER = "checkpoints/foundation/reader"  # released by `mindhier pretrain --stages reader --release`
FROM_SCRATCH = "the encoder and the stage-2 fine-tune; 40 min on a 2-core AMD EPYC with bf16"
# A stage is retrained whenever a checkpoint it was trained on changed ("init": the pretrained generator).
DEPENDS_ON = {"encoder": ("vision",), "generator": ("encoder", "tokenizer", "init")}


@dataclass(frozen=True)
class Recipe:
    """How much to train each fMRI stage, and which foundation recipe it builds on."""

    world: str
    foundation: str  # the `mindhier pretrain` recipe whose models are frozen / fine-tuned
    encoder: tuple[str, ...]
    generator: tuple[str, ...]
    reconstruct: tuple[str, ...] = ("--candidates", "4")
    report_images: int = 24
    strips: int = 4


# `demo` is sized for 2 CPU cores (≤ 45 min from the foundation models; measured times are in
# the README). Stage 1 is near its held-out plateau after 4 epochs. Stage 2 fine-tunes the
# pretrained generator (which already draws from vision features) to the encoder's noisier
# outputs. Sampling uses CFG 3, not the paper's 6: on this small generator CFG 6
# over-saturates. Every test image (300) is reconstructed: at batch 16 a demo image costs ~0.03 s
# (bench/RESULTS.md), so the whole set with two candidates and the oracle row takes well under a
# minute. `tiny` is what the test suite runs end to end.
RECIPES: dict[str, Recipe] = {
    "demo": Recipe(
        world="demo", foundation="demo",
        # --captions fixed: the released demo encoder's text targets (each image its caption i % 3);
        # `rotate`, the official code's rule and train-encoder's default, awaits the next re-release.
        encoder=("--preset", "demo", "--epochs", "4", "--global-batch", "64", "--lr", "5e-4", "--captions", "fixed"),
        generator=("--preset", "demo", "--steps", "1000", "--global-batch", "32", "--lr", "3e-4",
                   "--warmup", "50", "--sample-every", "250"),
        reconstruct=("--candidates", "2", "--cfg", "3"),
    ),
    "tiny": Recipe(
        world="tiny", foundation="tiny",
        encoder=("--preset", "tiny", "--epochs", "2", "--global-batch", "32", "--lr", "1e-3"),
        generator=("--preset", "tiny", "--steps", "30", "--global-batch", "16", "--lr", "1e-3",
                   "--warmup", "5"),
        reconstruct=("--candidates", "2", "--top-k", "0"),
        report_images=8,
        strips=2,
    ),
}


class DemoError(MindhierError):
    pass


@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return result


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def run_command(argv: list[str]) -> None:
    """Run one `mindhier` command in this process, printed first so users can repeat it."""
    from mindhier import cli

    say("$ mindhier " + " ".join(shlex.quote(a) for a in argv))
    code = cli.main(argv)
    if code:
        raise DemoError(f"`mindhier {argv[0]}` failed (exit code {code}); see its message above")


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------

def ensure_world(world_dir: Path, preset: str) -> None:
    """Generate the world unless an identical one (same preset config) is already there."""
    from mindhier.config import to_dict
    from mindhier.world import PRESETS, generate_world, read_world_info

    cfg = PRESETS[preset]
    info_path = world_dir / "world" / "world.json"
    if info_path.exists():
        info = read_world_info(world_dir)
        if info.get("config") == to_dict(cfg):
            say(f"world: reusing {world_dir} ({preset})")
            return
        raise DemoError(f"{world_dir} holds another world (not the {preset!r} preset of this code); "
                        f"remove it or pass --world another folder")
    if world_dir.is_dir() and any(world_dir.iterdir()):  # `mindhier world`'s "--force" is not a demo flag
        raise DemoError(f"{world_dir} is not empty and holds no world; the demo writes its world only into a new "
                        "or empty folder: pass --world another folder, or empty this one yourself")
    if world_dir.exists() and not world_dir.is_dir():
        raise DemoError(f"{world_dir} is a file; pass --world a folder for the world")
    say(f"world: generating the {preset!r} world into {world_dir}")
    generate_world(cfg, world_dir)


def stage_checkpoint(run_dir: Path, stage: str) -> Path:
    return run_dir / stage / stage


def foundation_checkpoints(folder: Path, recipe: Recipe) -> dict[str, Path]:
    """The foundation models the recipe builds on (``vision``, ``tokenizer``, ``generator``:
    the pretrained one), checked against this code's pretrain presets."""
    ck = {s: folder / s for s in FOUNDATION}
    missing = [s for s, p in ck.items() if not all(x.exists() for x in paths_for(p))]
    if missing:
        raise DemoError(f"foundation checkpoints missing in {folder}: {', '.join(missing)}. Create them with "
                        f"`mindhier pretrain --recipe {recipe.foundation} --release --checkpoints {folder}` "
                        "(hours on a CPU), or pass --rebuild-foundation")
    check_released_against_code({"vision": ck["vision"], "tokenizer": ck["tokenizer"]}, recipe)
    return ck


def rebuild_foundation(world: Path, corpus: Path | None, runs: Path, recipe: Recipe, release_to: Path | None,
                       timer: Timer) -> dict:
    """``mindhier pretrain`` for the recipe (corpus, reader, vision, tokenizer, generator) into
    ``runs``; released into ``release_to`` if given. Returns its checkpoints by role."""
    from mindhier import pretrain

    corpus = corpus or Path(f"corpora/{pretrain.RECIPES[recipe.foundation].corpus}")
    args = argparse.Namespace(recipe=recipe.foundation, corpus=str(corpus), world=str(world), out=str(runs),
                              stages=list(pretrain.STAGES), release=release_to is not None,
                              checkpoints=str(release_to))
    timer.run("pretrain", pretrain.run, args)
    if release_to is not None:
        return {s: release_to / s for s in (*FOUNDATION, "reader")}
    return pretrain.stage_commands(corpus, world, runs, pretrain.RECIPES[recipe.foundation])[1]


def fmri_stage_commands(world: Path, runs: Path, recipe: Recipe, subject: int,
                        foundation: dict[str, Path]) -> tuple[dict, dict, dict]:
    """(command per fMRI stage, every checkpoint by role, each stage's upstream checkpoints)."""
    ck = {"vision": foundation["vision"], "tokenizer": foundation["tokenizer"],
          **{s: stage_checkpoint(runs, s) for s in STAGES}}
    data = ["--data", str(world)]
    commands = {
        "encoder": ["train-encoder", *data, "--subject", str(subject), "--vision", str(ck["vision"]),
                    "--out", str(ck["encoder"].parent), *recipe.encoder],
        "generator": ["train-generator", *data, "--subject", str(subject), "--encoder", str(ck["encoder"]),
                      "--tokenizer", str(ck["tokenizer"]), "--init", str(foundation["generator"]),
                      "--out", str(ck["generator"].parent), *recipe.generator],
    }
    inputs = {**ck, "init": foundation["generator"]}
    return commands, ck, {stage: {dep: inputs[dep] for dep in DEPENDS_ON[stage]} for stage in STAGES}


def train_stages(world: Path, runs: Path, recipe: Recipe, subject: int, timer: Timer,
                 foundation: dict[str, Path], stages=STAGES) -> dict[str, Path]:
    """Train the fMRI stages (``stages``: a prefix of STAGES) from the foundation models, or
    reuse them (see :func:`run_stage`). Returns every checkpoint a reconstruction uses, by role."""
    commands, ck, upstream = fmri_stage_commands(world, runs, recipe, subject, foundation)
    for stage in stages:
        run_stage(stage, commands[stage], ck[stage], upstream[stage], timer)
    return ck


def run_stage(stage: str, command: list[str], ckpt: Path, upstream: dict[str, Path], timer: Timer,
              resume_from: Path | None = None) -> None:
    """Run one training stage, or reuse it: a stage whose ``demo_stage.json`` (written when its
    command finished) records the same command and the same upstream checkpoints is reused; an
    interrupted one (``resume_from``, default its checkpoint, exists) is resumed; anything else
    is retrained from scratch."""
    marker = ckpt.parent / "demo_stage.json"
    done = json.loads(marker.read_text()) if marker.exists() else None
    inputs = {dep: read_metadata(path).get("created") for dep, path in upstream.items()}
    if done and done.get("command") == command and done.get("inputs", {}) == inputs:
        say(f"{stage}: reusing {ckpt} (trained by the same command on the same inputs; delete the folder to retrain)")
        timer.seconds[f"train {stage}"] = done.get("seconds", 0.0)
        return
    if done:
        say(f"{stage}: {ckpt.parent} was trained by another command or on other inputs; retraining")
        shutil.rmtree(ckpt.parent)
    resume = ["--resume"] if paths_for(resume_from or ckpt)[1].exists() else []
    start = time.perf_counter()
    timer.run(f"train {stage}", run_command, command + resume)
    marker.write_text(json.dumps({"command": command, "inputs": inputs, "seconds": time.perf_counter() - start}))


# ---------------------------------------------------------------------------------------------
# Released checkpoints
# ---------------------------------------------------------------------------------------------

def released_checkpoints(folder: Path, recipe: Recipe) -> dict[str, Path]:
    """The released checkpoints by role, checked against this code (clear message if stale)."""
    ck = {s: folder / s for s in ROLES}
    missing = [s for s, p in ck.items() if not all(x.exists() for x in paths_for(p))]
    if missing:
        raise DemoError(f"released checkpoints missing in {folder}: {', '.join(missing)}. "
                        f"Train them with `mindhier demo --from-scratch` ({FROM_SCRATCH}).")
    check_released_against_code(ck, recipe)
    return ck


def preset_of(argv: tuple[str, ...]) -> str:
    """The ``--preset`` a stage's command line names."""
    return argv[argv.index("--preset") + 1]


# The release made before the foundation models existed: vision and tokenizer trained on the fMRI
# world with the `demo` presets, the generator from scratch (its checkpoint records no "init").
# It is read as what it is until a release on the foundation models replaces it.
WORLD_TRAINED_PRESETS = {"vision": "demo", "tokenizer": "demo"}


def stage_presets(recipe: Recipe, ck: dict[str, Path] | None = None) -> dict[str, str]:
    """The config preset each role is trained with under ``recipe`` (foundation ones from its
    pretrain recipe), or, for a world-trained release ``ck``, the presets it was made with."""
    from mindhier.pretrain import RECIPES as PRETRAIN

    base = PRETRAIN[recipe.foundation]
    presets = {"vision": preset_of(base.vision), "tokenizer": preset_of(base.tokenizer),
               "encoder": preset_of(recipe.encoder), "generator": preset_of(recipe.generator)}
    if ck is not None and "generator" in ck and "init" not in read_metadata(ck["generator"]):
        presets.update(WORLD_TRAINED_PRESETS)
    return presets


# Config fields each training command derives from the data or from the other stages rather
# than from the preset (so they are not compared with the preset).
DERIVED_FIELDS = {
    "vision": {"vocab_size"},
    "encoder": set(),
    "tokenizer": set(),
    "generator": {"scales", "vocab_size", "z_channels", "context_dim", "pooled_dim", "num_levels",
                  "tokens_per_level", "routing", "cond_drop_prob",
                  "level_norm", "cross_rope"},  # taken from the pretrained generator stage 2 starts from (--init)
}


def check_released_against_code(ck: dict[str, Path], recipe: Recipe) -> None:
    """Each released checkpoint must have been trained from the preset this code's ``recipe``
    names for it, and must load (strict keys and shapes) into the model this code builds from
    its config."""
    from mindhier.config import diff_configs, to_dict
    from mindhier.encoder import PRESETS as ENCODER
    from mindhier.generator import PRESETS as GENERATOR
    from mindhier.tokenizer import PRESETS as TOKENIZER
    from mindhier.vision.small_clip import PRESETS as VISION

    presets = {"vision": VISION, "encoder": ENCODER, "tokenizer": TOKENIZER, "generator": GENERATOR}
    names = stage_presets(recipe, ck)
    problems = []
    for stage, path in ck.items():
        expected = presets[stage][names[stage]]
        # a field added after the checkpoint was written reads as its default (what the older code did)
        defaults = {f.name: f.default for f in dataclasses.fields(expected) if f.default is not dataclasses.MISSING}
        found = {**json.loads(json.dumps(defaults)), **read_metadata(path).get("config", {})}
        diffs = [d for d in diff_configs(to_dict(expected), found)
                 if d.split(":")[0] not in DERIVED_FIELDS[stage]]
        if diffs:
            problems.append(f"{stage} ({paths_for(path)[1]}):\n    " + "\n    ".join(diffs[:6]))
    if problems:
        raise DemoError("the released checkpoints were trained with other configs than this code's "
                        f"presets for the {recipe.world!r} demo:\n  " + "\n  ".join(problems)
                        + f"\nRetrain them: `mindhier demo --from-scratch --release` ({FROM_SCRATCH}).")
    load_all(ck)


def load_all(ck: dict[str, Path]) -> None:
    """Load every checkpoint with its library loader (strict keys/shapes, config hashes)."""
    from mindhier.encoder import load_encoder
    from mindhier.reconstruct import load_generator
    from mindhier.tokenizer import load_tokenizer
    from mindhier.vision import load_vision

    loaders = {"vision": load_vision, "encoder": load_encoder, "tokenizer": load_tokenizer,
               "generator": load_generator}
    for stage, path in ck.items():
        try:
            loaders[stage](path)
        except MindhierError as err:
            raise DemoError(f"released {stage} checkpoint does not fit this code: {err}\n"
                            "Retrain them: `mindhier demo --from-scratch --release`.") from err


def check_same_data(encoder_ckpt: Path, world: Path, subject: int) -> None:
    """The released encoder must have been trained on exactly this world (same files)."""
    from mindhier.data import data_manifest, diff_manifests

    saved = read_metadata(encoder_ckpt).get("data_manifest")
    if not saved:
        raise DemoError(f"{paths_for(encoder_ckpt)[1]} records no data manifest; retrain with --from-scratch")
    diffs = diff_manifests(saved, data_manifest(world, [subject]))
    if diffs:
        raise DemoError(f"the world in {world} is not the one the released checkpoints were trained on:\n  "
                        + "\n  ".join(diffs[:6]) + "\nDelete the folder so the demo regenerates it, "
                        "or retrain with --from-scratch.")


def world_reader(path: str, recipe: Recipe) -> Path | None:
    """The reader checkpoint to use, if any: it must exist and read images of the recipe's world."""
    if path == "none" or not paths_for(Path(path))[1].exists():
        if path not in ("none", DEFAULT_READER):
            raise DemoError(f"--reader {path}: no checkpoint {paths_for(Path(path))[1]}; train one with "
                            "`mindhier pretrain --stages reader` or pass --reader none")
        return None
    from mindhier.world.config import PRESETS as WORLDS

    size = read_metadata(Path(path)).get("config", {}).get("image_size")
    if size != WORLDS[recipe.world].image_size:
        if path == DEFAULT_READER:
            return None  # the released reader reads the demo world's 64-px images, not the tiny world's
        raise DemoError(f"--reader {path} reads {size}-px images; the {recipe.world!r} world's are "
                        f"{WORLDS[recipe.world].image_size} px")
    return Path(path)


def reconstruct_argv(world: Path, subject: int, ck: dict[str, Path], out: Path, recipe: Recipe,
                     device: str = "auto") -> list[str]:
    return ["reconstruct", "--data", str(world), "--subject", str(subject),
            "--encoder", str(ck["encoder"]), "--tokenizer", str(ck["tokenizer"]),
            "--generator", str(ck["generator"]), "--vision", str(ck["vision"]),
            "--out", str(out), "--force", "--device", device, *recipe.reconstruct]


def with_option(argv: list[str], flag: str, value) -> list[str]:
    """``argv`` with ``flag value`` replacing any earlier value of that flag."""
    kept = [a for i, a in enumerate(argv) if not (a == flag or (i and argv[i - 1] == flag))]
    return kept + [flag, str(value)]


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="where reconstructions, metrics and report.html go")
    p.add_argument("--world", default=None, help="world folder (default: worlds/<recipe>)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="demo", help="demo size")
    p.add_argument("--subject", type=int, default=1, help="NSD subject number")
    p.add_argument("--from-scratch", action="store_true",
                   help="train the fMRI stages (encoder, generator fine-tune) here from the foundation "
                        f"models instead of using the released checkpoints ({FROM_SCRATCH})")
    p.add_argument("--rebuild-foundation", action="store_true",
                   help="with --from-scratch: first re-create the foundation models too (`mindhier pretrain`: "
                        "corpus, reader, small CLIP, tokenizer, pretrained generator; hours on a CPU)")
    p.add_argument("--corpus", default=None,
                   help="with --rebuild-foundation: the pretraining corpus folder (default: corpora/<recipe>; "
                        "written if absent)")
    p.add_argument("--checkpoints", default="checkpoints/demo", help="released checkpoints folder")
    p.add_argument("--foundation", default=DEFAULT_FOUNDATION,
                   help="released foundation checkpoints folder (vision, tokenizer, pretrained generator)")
    p.add_argument("--release", action="store_true",
                   help="with --from-scratch: copy the trained weights into --checkpoints with model cards "
                        "(with --rebuild-foundation, the foundation models into --foundation as well)")
    p.add_argument("--limit", type=int, default=None, help="reconstruct only the first N test images")
    p.add_argument("--reader", default=DEFAULT_READER,
                   help="world reader checkpoint that reads what the reconstructions show (used when present; "
                        "'none': the older linear probes)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")


def run(args: argparse.Namespace) -> int:
    from mindhier.demo_release import held_out_record, regression_metrics, release, write_model_cards
    from mindhier.demo_report import evaluate_and_report

    recipe = RECIPES[args.recipe]
    world = Path(args.world or f"worlds/{recipe.world}")
    out = Path(args.out)
    if args.release and not args.from_scratch:
        raise DemoError("--release needs --from-scratch (it publishes freshly trained weights)")
    if args.rebuild_foundation and not args.from_scratch:
        raise DemoError("--rebuild-foundation needs --from-scratch (the released fMRI stages were trained on "
                        "the released foundation models)")
    timer = Timer()
    timer.run("world", ensure_world, world, recipe.world)
    print_summary(world)
    reader = args.reader
    if args.from_scratch:
        if args.rebuild_foundation:
            base = rebuild_foundation(world, args.corpus and Path(args.corpus), out / "train" / "pretrain", recipe,
                                      Path(args.foundation) if args.release else None, timer)
            reader = str(base["reader"]) if args.reader == DEFAULT_READER else args.reader
        else:
            base = foundation_checkpoints(Path(args.foundation), recipe)
        ck = train_stages(world, out / "train", recipe, args.subject, timer, base)
        if args.release:
            ck = release(ck, Path(args.checkpoints))
    elif not Path(args.checkpoints).exists():
        say(f"this version ships no released checkpoints ({args.checkpoints} is absent), so the demo stops "
            "after the world. Train the fMRI stages here with `bash scripts/demo.sh --from-scratch` "
            f"({FROM_SCRATCH}); it ends with the same report.")
        return 0
    else:
        ck = released_checkpoints(Path(args.checkpoints), recipe)
        check_same_data(ck["encoder"], world, args.subject)
    recon_dir = out / "reconstruct"
    argv = reconstruct_argv(world, args.subject, ck, recon_dir, recipe, args.device)
    if args.limit:  # overrides the recipe's
        argv = with_option(argv, "--limit", args.limit)
    timer.run("reconstruct", run_command, argv)
    report = evaluate_and_report(world, args.subject, ck, recon_dir, out, recipe, timer, device=args.device,
                                 reader=world_reader(reader, recipe))
    if args.release:
        report["metrics"]["held_out"] = held_out_record(recon_dir, argv)
        report["metrics"]["regression"] = regression_metrics(world, args.subject, ck, out / "regression", recipe,
                                                             args.device)
        write_model_cards(ck, timer.seconds, report["metrics"], args.recipe)
    say(f"report: {out / 'report.html'} (also report.md)")
    return 0


if __name__ == "__main__":
    sys.exit(0)
