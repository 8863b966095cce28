"""`mindhier pretrain`: the demo's foundation models, trained on the pretraining corpus (SPEC §1.4).

MindHier's vision model (CLIP ViT-L/14), tokenizer (VQVAE-Switti) and generator (Switti) are
foundation models trained on far more images than NSD; only the encoder and the generator's
fine-tuning see fMRI. The demo's stand-ins are trained here, once, on the 100 k-image corpus:

  corpus     `mindhier corpus`              the world's scenes on their own seed stream, no fMRI
  reader     `mindhier train-reader`        the instrument: reads scene parameters from pictures
  vision     `mindhier train-vision`        the small CLIP (stand-in for CLIP ViT-L/14)
  tokenizer  `mindhier train-tokenizer`     the multi-scale VQ-VAE (stand-in for VQVAE-Switti)
  generator  `mindhier pretrain-generator`  conditioned on each image's own vision hierarchy (Switti)

Like CLIP and Switti weights, the results are released (``--release``: checkpoints/foundation,
bf16, each with a model card) and users do not retrain them; `mindhier demo --from-scratch`
trains the fMRI stages from them. Every stage is resumable: run the same command again after
an interruption and each stage continues where it stopped (finished stages are reused).

  mindhier pretrain --world worlds/demo                      # all stages (hours on 2 CPU cores)
  mindhier pretrain --world worlds/demo --stages reader --release
  torchrun --standalone --nproc_per_node=8 -m mindhier ...   (each stage's command runs alone too)
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mindhier.checkpoint import honour_umask, paths_for
from mindhier.curves import logged_seconds
from mindhier.demo import Timer, ensure_world, run_command, run_stage, say
from mindhier.demo_release import RELEASE_DTYPE
from mindhier.errors import MindhierError

STAGES = ("reader", "vision", "tokenizer", "generator")
DEPENDS_ON = {"reader": (), "vision": (), "tokenizer": (), "generator": ("vision", "tokenizer")}
# The file whose presence means a stage can be resumed (its resumable checkpoint).
RESUMABLE = {"reader": "last", "vision": "vision", "tokenizer": "last", "generator": "generator"}


@dataclass(frozen=True)
class PretrainRecipe:
    corpus: str
    world: str
    reader: tuple[str, ...]
    vision: tuple[str, ...]
    tokenizer: tuple[str, ...]
    generator: tuple[str, ...]
    # Warm restarts of the generator after its first round: each round starts from the one before
    # (`pretrain-generator --init`) with a fresh optimiser and schedule, in OUT/generator-r2, -r3, …
    generator_more: tuple[tuple[str, ...], ...] = ()


# `demo`: sized to train in one 3-hour session on 2 CPU cores. Measured on a 2-core Intel Xeon
# with AVX-512 bf16/AMX (bf16 autocast), two stages at a time with one thread each: reader 0.39 s
# per step (5000 steps, 32 min), vision 1.9 s (2 epochs = 1530 steps, 48 min), tokenizer 0.6 s
# (6000 steps, 61 min); the generator step measured 1.07 s at batch 32 with two threads
# (bench/bench_foundation.py). On the slowest machine seen (AMD EPYC without AVX-512, fp32) each
# is 3-5x slower. The vision stage is now the hybrid preset with the shape label loss for 4 epochs
# (3060 steps): 1.65 s per step with two threads on a 2-core AMD EPYC with AVX-512 bf16, ≈ 89 min;
# the generator's 1800 steps took 2.0 s each there (60 min), and it was still improving: too few.
# `tiny` is what the tests run.
RECIPES: dict[str, PretrainRecipe] = {
    "demo": PretrainRecipe(
        corpus="demo", world="demo",
        reader=("--preset", "demo", "--steps", "5000", "--batch", "128", "--lr", "2e-3", "--save-every", "250"),
        vision=("--preset", "hybrid", "--epochs", "4", "--global-batch", "128", "--lr", "1e-3",
                "--hard-negatives", "shape", "--label-loss", "1"),
        tokenizer=("--preset", "foundation", "--steps", "6000", "--global-batch", "16", "--lr", "2e-3",
                   "--save-every", "250"),
        generator=("--preset", "demo", "--steps", "1800", "--global-batch", "32", "--lr", "1e-3",
                   "--warmup", "100", "--save-every", "200", "--sample-every", "400", "--no-cross-rope"),
        # The first round ended at loss 6.5 still falling; the second sees other samples (seed 1).
        # Round 2 (4000 steps in all) lifted the oracle's shape rate from 9.7 % to 15.0 % and was
        # still improving at the end (loss 5.66); round 3 continues it on other samples (seed 2):
        # loss 5.22, but shape 14.7 %, position 24 %: its cross-attention did not localise (mass on
        # a token's own patch at chance). Round 4 switches cross-attention RoPE on (same weights):
        # 800 steps took the oracle to shape 31 %, position 76 %, PixCorr 0.85 (README, issue 11).
        # Rounds 1-3 ran before the preset had cross_rope; they say so, to reproduce the release.
        generator_more=(("--preset", "demo", "--steps", "2200", "--global-batch", "32", "--lr", "5e-4",
                         "--warmup", "100", "--seed", "1", "--save-every", "200", "--sample-every", "400",
                         "--no-cross-rope"),
                        ("--preset", "demo", "--steps", "2000", "--global-batch", "32", "--lr", "5e-4",
                         "--warmup", "100", "--seed", "2", "--save-every", "200", "--sample-every", "400",
                         "--no-cross-rope"),
                        ("--preset", "demo", "--steps", "800", "--global-batch", "32", "--lr", "5e-4",
                         "--warmup", "50", "--seed", "3", "--save-every", "100", "--sample-every", "200",
                         "--cross-rope")),
    ),
    "tiny": PretrainRecipe(
        corpus="tiny", world="tiny",
        reader=("--preset", "tiny", "--steps", "20", "--batch", "32", "--save-every", "10"),
        vision=("--preset", "tiny", "--epochs", "1", "--global-batch", "32", "--hard-negatives", "shape",
                "--label-loss", "1"),
        tokenizer=("--preset", "tiny", "--steps", "10", "--global-batch", "8"),
        generator=("--preset", "tiny", "--steps", "6", "--global-batch", "8", "--warmup", "2",
                   "--sample-every", "0", "--sample-images", "2"),
        generator_more=(("--preset", "tiny", "--steps", "2", "--global-batch", "8", "--warmup", "1",
                         "--seed", "1", "--sample-every", "0", "--sample-images", "2"),),
    ),
}


# The reader is the instrument and small (0.8 M params): stored in float32, so the rates in its card
# (computed by train-reader) are exactly those of the downloaded file (bf16 moved one test image of 300).
RELEASE_DTYPES = {"reader": torch.float32}


class PretrainError(MindhierError):
    pass


def stage_commands(corpus: Path, world: Path, runs: Path, recipe: PretrainRecipe,
                   frozen: dict[str, Path] | None = None) -> tuple[dict, dict]:
    """(command per stage, final checkpoint per stage). ``frozen``: the vision model and
    tokenizer the generator is conditioned on and tokenized by (default: those trained in ``runs``)."""
    ck = {"reader": runs / "reader" / "reader", "vision": runs / "vision" / "vision",
          "tokenizer": runs / "tokenizer" / "tokenizer", "generator": runs / "generator" / "generator"}
    frozen = {**ck, **(frozen or {})}
    data = ["--data", str(corpus)]
    commands = {
        "reader": ["train-reader", *data, "--world", str(world), "--out", str(ck["reader"].parent), *recipe.reader],
        "vision": ["train-vision", *data, "--out", str(ck["vision"].parent), *recipe.vision],
        "tokenizer": ["train-tokenizer", *data, "--out", str(ck["tokenizer"].parent), *recipe.tokenizer],
        "generator": ["pretrain-generator", *data, "--vision", str(frozen["vision"]),
                      "--tokenizer", str(frozen["tokenizer"]), "--out", str(ck["generator"].parent), *recipe.generator],
    }
    return commands, ck


def run_generator_rounds(first: list[str], first_ckpt: Path, recipe: PretrainRecipe, inputs: dict,
                         timer: Timer) -> Path:
    """The generator's warm restarts (``recipe.generator_more``), each from the round before;
    the last round's checkpoint is the stage's."""
    frozen = first[first.index("--vision"):first.index("--out")]  # corpus, vision model, tokenizer
    data = first[1:first.index("--vision")]
    ckpt = first_ckpt
    for number, argv in enumerate(recipe.generator_more, start=2):
        out = first_ckpt.parent.with_name(f"{first_ckpt.parent.name}-r{number}")
        command = ["pretrain-generator", *data, *frozen, "--out", str(out), "--init", str(ckpt), *argv]
        run_stage(f"generator round {number}", command, out / "generator",
                  {"generator": ckpt, **{dep: inputs[dep] for dep in DEPENDS_ON["generator"]}}, timer)
        ckpt = out / "generator"
    return ckpt


def ensure_corpus(corpus: Path, preset: str) -> None:
    from mindhier.world.corpus import is_corpus

    if is_corpus(corpus):
        say(f"corpus: reusing {corpus}")
        return
    run_command(["corpus", "--preset", preset, "--out", str(corpus), "--quiet"])


def release_stage(stage: str, ckpt: Path, folder: Path, corpus: Path, seconds: float | None, recipe: str) -> Path:
    """Copy one stage's model tensors (bf16) and metadata into ``folder`` with its model card;
    the stage's previous release files are replaced, other stages' are kept."""
    from safetensors.torch import load_file, save_file

    from mindhier.checkpoint import model_tensors
    from mindhier.world.corpus import read_corpus_info

    folder.mkdir(parents=True, exist_ok=True)
    weights, meta_path = paths_for(ckpt)
    dtype = RELEASE_DTYPES.get(stage, RELEASE_DTYPE)
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model_tensors(load_file(str(weights))).items()}
    meta = json.loads(meta_path.read_text())
    meta.pop("optimizer", None)
    meta.pop("write_id", None)  # it names the training save; the release is a new file without it
    if meta.get("train_seconds") is not None:  # the command's own total over all its resumed invocations
        seconds = meta["train_seconds"]
    rounds = meta.get("pretrain", {}).get("earlier_rounds")
    if rounds:  # a warm-restarted generator: every round's steps (reused rounds cost nothing this time)
        seconds = sum(r.get("train_seconds") or 0.0 for r in rounds) + (logged_seconds(ckpt.parent) or 0.0)
    corpus_info = read_corpus_info(corpus)
    meta["released"] = {"dtype": str(dtype).replace("torch.", ""), "from": str(ckpt),
                        "corpus": {**corpus_info["config"], "images_sha256": corpus_info["images_sha256"]},
                        "train_seconds": seconds}
    save_file(tensors, str(folder / f"{stage}.safetensors"), metadata={"kind": meta["kind"]})
    honour_umask(folder / f"{stage}.safetensors")  # safetensors writes 0600; the .json is 0644
    (folder / f"{stage}.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    evaluation, probe = ckpt.parent / "eval.json", ckpt.parent / "probe"
    if evaluation.is_file():
        shutil.copyfile(evaluation, folder / f"{stage}_eval.json")
    if probe.with_suffix(".json").is_file():
        shutil.copyfile(probe.with_suffix(".json"), folder / f"{stage}_probe.json")
    (folder / f"{stage}.md").write_text(model_card(stage, meta, seconds, recipe, evaluation, probe.with_suffix(".md")))
    say(f"{stage}: released to {folder / stage}")
    return folder / stage


def model_card(stage: str, meta: dict, seconds: float | None, recipe: str, evaluation: Path, probe: Path) -> str:
    corpus = meta["released"]["corpus"]
    lines = [f"# mindhier foundation checkpoint: {stage}", "",
             f"Trained by `mindhier pretrain --recipe {recipe} --stages {stage} --release` "
             "(see `mindhier.pretrain.RECIPES`) on the pretraining corpus; no fMRI.", "",
             f"- kind: `{meta.get('kind')}`, config hash `{meta.get('config_hash')}`",
             f"- git commit: `{meta.get('git_commit')}`",
             f"- corpus: {corpus['size']} images of {corpus['image_size']} px, seed {corpus['seed']}, "
             f"images sha256 `{corpus['images_sha256'][:16]}…`",
             f"- weights stored as {meta['released']['dtype']}",
             f"- training time: {seconds:.0f} s (the command's own total over its invocations)"
             if seconds else "- training time: not recorded",
             *rounds_lines(meta),
             "", "## Config", "", "```json", json.dumps(meta.get("config"), indent=1, sort_keys=True), "```", ""]
    if evaluation.is_file():
        lines += ["## Held-out evaluation (as written by the training command)", "", "```json",
                  evaluation.read_text().strip(), "```", ""]
    if probe.is_file():
        lines += ["## What each layer carries (`mindhier probe-vision`, on the world's test stimuli)", "",
                  probe.read_text().strip(), ""]
    return "\n".join(lines)


def rounds_lines(meta: dict) -> list[str]:
    """A warm-restarted generator's rounds, in order, for its card."""
    rounds = meta.get("pretrain", {}).get("earlier_rounds")
    if not rounds:
        return []
    train, last = meta.get("train", {}), meta.get("progress", {}).get("step")
    steps = [*(r["steps"] for r in rounds), last]
    lines = [f"- trained in {len(steps)} rounds, {sum(s or 0 for s in steps)} steps in all, each round from the one "
             "before (`pretrain-generator --init`, fresh optimiser and schedule):"]
    for n, r in enumerate(rounds, 1):
        lines.append(f"  {n}. {r['steps']} steps at batch {r['global_batch']}, peak lr {r['lr']}, "
                     f"{r.get('train_seconds') or 0:.0f} s")
    lines.append(f"  {len(steps)}. {last} steps at batch {train.get('global_batch')}, peak lr {train.get('lr')}")
    return lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", choices=sorted(RECIPES), default="demo", help="corpus and model sizes")
    p.add_argument("--corpus", default=None, help="corpus folder (default: corpora/<recipe>; written if absent)")
    p.add_argument("--world", default=None,
                   help="the fMRI world whose test stimuli the reader is checked on (default: worlds/<recipe>)")
    p.add_argument("--out", default="runs/pretrain", help="training runs (one folder per stage)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="which stages to run")
    p.add_argument("--release", action="store_true", help="copy each finished stage into --checkpoints with a model card")
    p.add_argument("--checkpoints", default="checkpoints/foundation", help="released foundation checkpoints folder")


def run(args: argparse.Namespace) -> int:
    recipe = RECIPES[args.recipe]
    corpus = Path(args.corpus or f"corpora/{recipe.corpus}")
    world = Path(args.world or f"worlds/{recipe.world}")
    timer = Timer()
    timer.run("corpus", ensure_corpus, corpus, recipe.corpus)
    ensure_world(world, recipe.world)
    # Released, the generator is pretrained on the released vision model and tokenizer (bf16), the
    # very files the fMRI stages then use: its record of them must match theirs.
    released = Path(args.checkpoints)
    frozen = {s: released / s for s in DEPENDS_ON["generator"]} if args.release else None
    commands, ck = stage_commands(corpus, world, Path(args.out), recipe, frozen)
    inputs = {**ck, **(frozen or {})}
    for stage in STAGES:
        if stage not in args.stages:
            continue
        missing = [dep for dep in DEPENDS_ON[stage] if not paths_for(inputs[dep])[1].exists()]
        if missing:
            where = f" released in {released}" if args.release else ""
            raise PretrainError(f"{stage} needs the finished{where} {', '.join(missing)} stage(s) first: "
                                "add them to --stages")
        run_stage(stage, commands[stage], ck[stage], {dep: inputs[dep] for dep in DEPENDS_ON[stage]}, timer,
                  resume_from=ck[stage].parent / RESUMABLE[stage])
        if stage == "generator":
            ck[stage] = run_generator_rounds(commands[stage], ck[stage], recipe, inputs, timer)
        if stage == "vision":  # the hierarchy the encoder is aligned to, measured (seconds)
            run_command(["probe-vision", "--vision", str(ck[stage]), "--world", str(world), "--all-layers",
                         "--out", str(ck[stage].parent / "probe")])
        if args.release:
            release_stage(stage, ck[stage], released, corpus, timer.seconds.get(f"train {stage}"), args.recipe)
    say("times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timer.seconds.items()))
    return 0

