"""Releasing the demo's checkpoints: the complete pipeline folder (``checkpoints/demo``), its
model cards, and the regression record that ``tests/test_released_checkpoints.py`` replays.

Split from :mod:`mindhier.demo` (which calls it with ``--release``); nothing here trains.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import torch

from mindhier.checkpoint import honour_umask, paths_for, read_metadata
from mindhier.demo import ROLES, STAGES, Recipe, reconstruct_argv, run_command, say, with_option

# The released weights' regression check: the first REGRESSION_IMAGES test images, single-shot,
# seed 0, scored by every offline metric. Sampling is seeded per image and independent of
# batching, so where the platform (runtime.platform_fingerprint: torch build, CPU model, bf16
# support, threads) is the release's, the images repeat bit for bit and are compared by hash;
# elsewhere bf16/BLAS rounding can flip a sampled token here and there, and the metrics must
# agree within REGRESSION_TOLERANCE.
REGRESSION_IMAGES = 16
REGRESSION_TOLERANCE = 0.03


def regression_metrics(world: Path, subject: int, ck: dict[str, Path], out: Path, recipe: Recipe,
                       device: str = "auto") -> dict:
    """Every offline metric of the fixed regression subset (see REGRESSION_IMAGES), the hash of
    its images, the command that made them, the platform it ran on and the whole world's hashes."""
    import hashlib

    from safetensors.torch import load_file

    from mindhier.data.manifest import data_manifest
    from mindhier.demo_report import load_test_images
    from mindhier.evaluate import evaluate_reconstructions
    from mindhier.metrics import offline_metrics, pixel_metrics
    from mindhier.runtime import platform_fingerprint
    from mindhier.vision import load_vision

    argv = reconstruct_argv(world, subject, ck, out, recipe, device)
    for flag, value in (("--limit", REGRESSION_IMAGES), ("--candidates", 1), ("--seed", 0), ("--coarse-to-fine", 0)):
        argv = with_option(argv, flag, value)
    run_command(argv)
    recons = load_file(str(out / "recons.safetensors"))
    gts = load_test_images(world, subject, recons["image_index"].numpy())
    vision = load_vision(ck["vision"])
    metrics = pixel_metrics() + offline_metrics(lambda x: vision.image_embedding(x))
    values = evaluate_reconstructions(recons["recons"].float(), gts, metrics=metrics)["values"]
    images = recons["recons"].float().contiguous().numpy().tobytes()
    return {"images": [int(i) for i in recons["image_index"]], "command": "mindhier " + shlex.join(argv),
            "pinned_command": pinned_command(argv),
            **{k: v for k, v in values.items() if v is not None}, "tolerance": REGRESSION_TOLERANCE,
            "recons_sha256": hashlib.sha256(images).hexdigest(), "platform": platform_fingerprint(),
            "world": data_manifest(world, [subject], full=True)}  # every file hashed whole


def pinned_command(argv: list[str]) -> str:
    """What must not change between the release and its recomputation: every option but where the files are."""
    for flag in ("--data", "--out", "--encoder", "--tokenizer", "--generator", "--vision"):
        argv = with_option(argv, flag, flag.strip("-").upper())
    return "mindhier " + shlex.join(argv)


# The model cards' held-out rows (every test image, single-shot and best-of-N: the metrics and the
# world reader's attribute rates) are recomputed from the released files by the release test:
# exactly where the platform is the release's (the same images, by hash), elsewhere each metric's
# mean within HELD_OUT_TOLERANCE (a few flipped tokens move a 300-image mean by about the seed-to-
# seed spread, ≈ 0.01-0.03 as ablation_check.json records for the reader) and each attribute rate
# inside its recorded 95 % interval.
HELD_OUT_TOLERANCE = 0.03


def held_out_record(recon_dir: Path, argv: list[str]) -> dict:
    """How the card's held-out rows were made: the pinned command, the platform, each set's hash."""
    from mindhier.ablation_check import images_sha256
    from mindhier.run_report import read_recon_folder
    from mindhier.runtime import platform_fingerprint

    recon = read_recon_folder(recon_dir)
    return {"pinned_command": pinned_command(argv), "platform": platform_fingerprint(),
            "recons_sha256": {label: images_sha256(images.float()) for label, images in recon.sets.items()},
            "tolerance": HELD_OUT_TOLERANCE}


def held_out_rows(world: Path, subject: int, ck: dict[str, Path], out: Path, recipe: Recipe, reader: Path,
                  device: str = "auto") -> dict:
    """The card's MindHier rows recomputed from the checkpoints in ``ck``: every test image
    reconstructed by the recipe's command, scored and read as the demo's report does."""
    from mindhier.demo_report import load_test_images, method_rows, reader_attribute_rates, score_rows
    from mindhier.run_report import read_recon_folder
    from mindhier.runtime import resolve_device

    argv = reconstruct_argv(world, subject, ck, out, recipe, device)
    run_command(argv)
    recon = read_recon_folder(out)
    gts = load_test_images(world, subject, recon.image_index)
    rows, dev = method_rows(recon), resolve_device(device)
    shown = reader_attribute_rates(reader, world, subject, rows, gts, recon.image_index, dev)
    return {"reconstruction": score_rows(ck["vision"], rows, gts, dev),
            "attributes": {name: rates for name, rates in shown if name in rows}, **held_out_record(out, argv)}


RELEASE_DTYPE = torch.bfloat16  # halves the committed size (≤ 50 MB in all); loaders upcast on load


def release(ck: dict[str, Path], folder: Path) -> dict[str, Path]:
    """Write the demo's complete pipeline folder: the fMRI stages' trained weights (model tensors
    only, stored in bf16) with their metadata, beside byte-for-byte copies of the foundation
    vision model and tokenizer they were trained on (with their cards; git stores an identical
    file once), so ``Pipeline.from_pretrained(folder)`` needs nothing else.

    The demo then reconstructs and evaluates with these released files, so the metrics written
    into the model cards are those of exactly the weights a user downloads."""
    from safetensors.torch import load_file, save_file

    from mindhier.checkpoint import model_tensors

    if folder.exists():
        shutil.rmtree(folder)  # replace the whole release: no stale stage survives
    folder.mkdir(parents=True)
    foundation = {role: str(ck[role]) for role in ("vision", "tokenizer")}
    for role, path in foundation.items():
        for source in (*paths_for(Path(path)), Path(path).with_suffix(".md")):
            if source.is_file():
                shutil.copyfile(source, folder / f"{role}{source.suffix}")
    for stage in STAGES:
        weights, meta_path = paths_for(ck[stage])
        tensors = {k: v.to(RELEASE_DTYPE) if v.is_floating_point() else v
                   for k, v in model_tensors(load_file(str(weights))).items()}
        meta = json.loads(meta_path.read_text())
        meta.pop("optimizer", None)
        meta.pop("write_id", None)  # it names the training save; the release is a new file without it
        meta["released"] = {"dtype": str(RELEASE_DTYPE).replace("torch.", ""), "from": str(ck[stage]),
                            "foundation": foundation}
        save_file(tensors, str(folder / f"{stage}.safetensors"), metadata={"kind": meta["kind"]})
        honour_umask(folder / f"{stage}.safetensors")  # safetensors writes 0600; the .json is 0644
        (folder / f"{stage}.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    say(f"released checkpoints written to {folder}")
    return {role: folder / role for role in ROLES}


def write_model_cards(ck: dict[str, Path], timings: dict[str, float], metrics: dict, recipe_name: str) -> None:
    for stage in STAGES:
        path = ck[stage]
        meta = read_metadata(path)
        card = model_card(stage, meta, timings.get(f"train {stage}"), metrics, recipe_name)
        paths_for(path)[0].with_suffix(".md").write_text(card)
    (ck["generator"].parent / "metrics.json").write_text(json.dumps(metrics, indent=2))


def compute_used() -> str:
    """The CPU cores this process may use and its threads (the training commands it ran inherit
    both), for a card's training time: the same run takes twice as long on one pinned thread."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} CPU core(s), {torch.get_num_threads()} thread(s)"


def model_card(stage: str, meta: dict, seconds: float | None, metrics: dict, recipe_name: str) -> str:
    manifest = meta.get("data_manifest", {})
    lines = [f"# mindhier demo checkpoint: {stage}", "",
             f"Trained by `mindhier demo --from-scratch --recipe {recipe_name}` (see `mindhier.demo.RECIPES`).", "",
             f"- kind: `{meta.get('kind')}`",
             f"- config hash: `{meta.get('config_hash')}`",
             f"- git commit: `{meta.get('git_commit')}`",
             f"- data: synthetic world {json.dumps(manifest.get('world'))}, subjects {manifest.get('subjects')}",
             f"- weights stored as {meta.get('released', {}).get('dtype', 'float32')}",
             f"- foundation models (frozen vision and tokenizer; stage 2 fine-tunes the pretrained generator): "
             f"{json.dumps(meta.get('released', {}).get('foundation'))}",
             f"- training time: {seconds:.0f} s on {compute_used()}" if seconds else "- training time: not recorded",
             "", "## Config", "", "```json", json.dumps(meta.get("config"), indent=1, sort_keys=True), "```", "",
             "## Held-out metrics of the whole pipeline with these released weights", "",
             "```json", json.dumps(metrics, indent=1), "```", "",
             "## Data manifest", "",
             "The files it was trained on (`scope`: hashed in full, or `edges`: the first and last 8 MiB",
             "and the size of large files).", "",
             "| file | bytes | sha256 | scope |", "|---|---|---|---|"]
    lines += [f"| `{name}` | {f.get('size')} | `{f.get('sha256')}` | {f.get('scope')} |"
              for name, f in sorted(manifest.get("files", {}).items())]
    return "\n".join(lines + [""])
