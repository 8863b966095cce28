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
    pinned = argv  # what must not change: every option but where the files are
    for flag in ("--data", "--out", "--encoder", "--tokenizer", "--generator", "--vision"):
        pinned = with_option(pinned, flag, flag.strip("-").upper())
    return {"images": [int(i) for i in recons["image_index"]], "command": "mindhier " + shlex.join(argv),
            "pinned_command": "mindhier " + shlex.join(pinned),
            **{k: v for k, v in values.items() if v is not None}, "tolerance": REGRESSION_TOLERANCE,
            "recons_sha256": hashlib.sha256(images).hexdigest(), "platform": platform_fingerprint(),
            "world": data_manifest(world, [subject], full=True)}  # every file hashed whole


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
             f"- training time: {seconds:.0f} s on 2 CPU cores" if seconds else "- training time: not recorded",
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
