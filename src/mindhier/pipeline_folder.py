"""Pipeline folders: a set of checkpoints that belong together, plus a small manifest.

    FOLDER/encoder.safetensors + encoder.json        the stage-1 encoder (subject-specific)
    FOLDER/tokenizer.safetensors + tokenizer.json    the multi-scale VQ-VAE
    FOLDER/generator.safetensors + generator.json    the stage-2 generator
    FOLDER/vision.safetensors + vision.json          the vision model best-of-N ranks with (optional;
                                                     a Hugging Face CLIP is a folder FOLDER/vision/)
    FOLDER/pipeline.json                             which file is which role, subject, voxel count,
                                                     and the identity of every checkpoint

``Pipeline.save_pretrained`` writes such a folder: model weights only (optimizer and RNG state
dropped), each checkpoint's JSON byte for byte, so the identities the generator records of its
encoder and tokenizer still match. A folder without ``pipeline.json`` (the released
``checkpoints/demo``) is read by the standard names. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from mindhier.checkpoint import git_commit, honour_umask, load_checkpoint, model_tensors, paths_for
from mindhier.pipeline import MANIFEST, MANIFEST_FORMAT, ROLES, PipelineError, checkpoint_identity

FORMAT_VERSION = 1
STANDARD_NAMES = {"encoder": "encoder", "tokenizer": "tokenizer", "generator": "generator", "vision": "vision"}
SAVE_HINT = "write a complete folder with Pipeline.save_pretrained(DIR), or use the released checkpoints/demo"


# ---------------------------------------------------------------------------------------------
# reading


def find_checkpoints(folder) -> tuple[dict[str, Path], dict | None]:
    """(role → checkpoint stem or vision folder, manifest or None) of a pipeline folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PipelineError(f"{folder}: no such folder; a pipeline folder holds the encoder, tokenizer and "
                            f"generator checkpoints (+ vision): {SAVE_HINT}")
    manifest = read_manifest(folder)
    names = manifest["files"] if manifest is not None else STANDARD_NAMES
    files, missing = {}, []
    for role in (*ROLES, "vision"):
        name = names.get(role)
        if name is None:
            if role != "vision":
                missing.append(f"{role} (not named in {folder / MANIFEST})")
            continue
        path = folder / checked_name(name, folder)
        if is_checkpoint(path) or (role == "vision" and path.is_dir()):
            files[role] = path
        elif role != "vision" or manifest is not None:   # without a manifest, vision is optional
            weights, meta = paths_for(path)
            missing.append(f"{role} ({weights.name} + {meta.name})")
    if missing:
        raise PipelineError(f"{folder}: missing {', '.join(missing)}; copy the checkpoint pair there from where it "
                            f"was trained (e.g. OUT/encoder of `mindhier train-encoder`), or {SAVE_HINT}")
    return files, manifest


def is_checkpoint(path: Path) -> bool:
    return all(p.is_file() for p in paths_for(path))


def checked_name(name, folder: Path) -> str:
    """A manifest names files inside its folder, never a path elsewhere."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise PipelineError(f"{folder / MANIFEST}: file name {name!r} is not a plain name inside the folder; "
                            f"re-save the folder with Pipeline.save_pretrained")
    return name


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PipelineError(f"{path} is not valid JSON ({err}); delete it to load the folder by its standard "
                            "names, or re-save the folder with Pipeline.save_pretrained") from err
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
            or not isinstance(manifest.get("files"), dict):
        raise PipelineError(f"{path} is not a mindhier pipeline manifest (format {MANIFEST_FORMAT!r} with 'files')")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise PipelineError(f"{path} has format version {manifest['format_version']}; this mindhier reads up to "
                            f"{FORMAT_VERSION}: update mindhier")
    return manifest


def check_manifest(manifest: dict, pipe, folder) -> None:
    """The manifest must describe the checkpoints found beside it."""
    path = Path(folder) / MANIFEST
    found = {"subject": pipe.subject, "num_voxels": pipe.num_voxels,
             **{f"identity of {role}": checkpoint_identity(pipe.metadata[role]) for role in ROLES}}
    recorded = {"subject": manifest.get("subject"), "num_voxels": manifest.get("num_voxels"),
                **{f"identity of {role}": manifest.get("identities", {}).get(role) for role in ROLES}}
    diffs = [f"{k}: manifest {recorded[k]!r}, checkpoint {found[k]!r}" for k in found if recorded[k] != found[k]]
    if diffs:
        raise PipelineError(f"{path} does not describe the checkpoints in {folder} (a file was replaced after "
                            "save_pretrained?):\n  " + "\n  ".join(diffs)
                            + "\nRe-save the folder with Pipeline.save_pretrained, or delete pipeline.json.")


# ---------------------------------------------------------------------------------------------
# writing


def save_folder(pipe, folder, *, overwrite: bool = False) -> Path:
    """Copy ``pipe``'s checkpoints into ``folder`` under the standard names and write the manifest."""
    folder = Path(folder)
    plan = {role: (Path(src), folder / STANDARD_NAMES[role]) for role, src in pipe.checkpoints.items()}
    to_copy = {role: pair for role, pair in plan.items() if not same_place(*pair)}
    conflicts = [str(t) for _, dst in to_copy.values() for t in targets(dst) if t.exists()]
    if (folder / MANIFEST).exists():
        conflicts.append(str(folder / MANIFEST))
    if conflicts and not overwrite:
        raise PipelineError(f"{folder}: {', '.join(conflicts)} already exist; pass overwrite=True or choose "
                            "another folder")
    folder.mkdir(parents=True, exist_ok=True)
    for role, (src, dst) in to_copy.items():
        if Path(src).is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)   # a Hugging Face CLIP folder, as it is
        else:
            copy_checkpoint(src, dst, role, pipe.metadata.get(role))
    write_json_atomically(folder / MANIFEST, manifest_for(pipe, plan))
    return folder


def targets(dst: Path) -> list[Path]:
    return [dst] if dst.is_dir() else list(paths_for(dst))


def same_place(src: Path, dst: Path) -> bool:
    if src.is_dir():
        return dst.is_dir() and src.resolve() == dst.resolve()
    return paths_for(src)[0].resolve() == paths_for(dst)[0].resolve()


def copy_checkpoint(src: Path, dst: Path, role: str, loaded_meta: dict | None) -> None:
    """Model tensors of ``src`` (as stored: same dtype) and its JSON byte for byte, atomically."""
    from safetensors.torch import save_file

    tensors, meta = load_checkpoint(src, kind=role)
    if loaded_meta is not None and checkpoint_identity(meta) != checkpoint_identity(loaded_meta):
        raise PipelineError(f"{paths_for(src)[1]} changed since this pipeline loaded it; load the pipeline again "
                            "before saving it")
    weights, meta_path = paths_for(dst)
    tmp_w, tmp_m = weights.with_suffix(".safetensors.tmp"), meta_path.with_suffix(".json.tmp")
    save_file({k: v.contiguous() for k, v in model_tensors(tensors).items()}, str(tmp_w),
              metadata={"kind": meta["kind"]})
    shutil.copyfile(paths_for(src)[1], tmp_m)
    honour_umask(tmp_w, tmp_m)  # safetensors writes 0600; the copied .json already has the umask mode
    os.replace(tmp_w, weights)
    os.replace(tmp_m, meta_path)


def manifest_for(pipe, plan: dict) -> dict:
    from mindhier import __version__

    return {
        "format": MANIFEST_FORMAT, "format_version": FORMAT_VERSION,
        "files": {role: STANDARD_NAMES[role] if role in plan else None for role in STANDARD_NAMES},
        "subject": pipe.subject, "num_voxels": pipe.num_voxels, "image_size": pipe.image_size,
        "num_scales": pipe.num_scales, "num_levels": int(pipe.generator.cfg.num_levels),
        "identities": {role: checkpoint_identity(pipe.metadata[role]) for role in ROLES},
        "sources": {role: str(src) for role, (src, _) in plan.items()},
        "mindhier_version": __version__, "git_commit": git_commit(), "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json_atomically(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
