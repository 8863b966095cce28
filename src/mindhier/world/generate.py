"""``generate_world``: images → captions → simulated cortex → files in MindEye2 layout."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mindhier.config import ConfigError, to_dict
from mindhier.data import layout
from mindhier.errors import MindhierError
from mindhier.world import cortex as cortex_mod
from mindhier.world import writer
from mindhier.world.config import PRESETS, WorldConfig
from mindhier.world.design import choose_test_images, make_design
from mindhier.world.images import (BACKGROUNDS, CATEGORIES, COLOUR_NAMES, SUPERSAMPLE, caption_array, render_scene,
                                   sample_scenes)

WORLD_FORMAT = 1


class WorldExistsError(MindhierError):
    """The output folder already holds files."""


def check_config(cfg: WorldConfig) -> None:
    problems = []
    if not 0 < cfg.trials_per_session <= layout.TRIALS_PER_SESSION:
        problems.append(f"trials_per_session={cfg.trials_per_session} must be in 1..{layout.TRIALS_PER_SESSION}")
    if not 0 < cfg.n_test < cfg.n_images or cfg.n_train < 1:
        problems.append(f"need n_train >= 1 and n_test >= 1 (got {cfg.n_train}, {cfg.n_test})")
    if (cfg.image_size * SUPERSAMPLE) % cfg.feature_grid or cfg.image_size % cfg.feature_grid:
        problems.append(f"feature_grid={cfg.feature_grid} must divide image_size={cfg.image_size}")
    if not cfg.subjects or len(set(cfg.subjects)) != len(cfg.subjects) or min(cfg.subjects) < 1:
        problems.append(f"subjects={cfg.subjects} must be distinct positive NSD numbers")
    if problems:
        raise ConfigError("invalid world config: " + "; ".join(problems))


def _prepare_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise WorldExistsError(f"{out} is a file; choose a folder for the world (--out)")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise WorldExistsError(
                f"{out} is not empty; refusing to overwrite it. Pass --force (force=True) to replace "
                f"the world files in it, or choose another --out")
        # Remove only what a world writes, so stale subjects cannot mix with the new world.
        for p in out.glob("betas_all_subj*_fp32_renorm.hdf5"):
            p.unlink()
        for p in (layout.images_hdf5_path(out), layout.captions_path(out)):
            p.unlink(missing_ok=True)
        for d in (out / "wds", layout.world_dir(out)):
            shutil.rmtree(d, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def render_images(scenes, cfg: WorldConfig, show_progress: bool) -> tuple[np.ndarray, np.ndarray]:
    n, s, g = len(scenes), cfg.image_size, cfg.feature_grid
    images = np.empty((n, s, s, 3), dtype=np.float32)
    coverage = np.zeros((n, 3, g, g), dtype=np.float32)
    for i, scene in enumerate(tqdm(scenes, desc="images", disable=not show_progress, dynamic_ncols=True)):
        images[i], cov = render_scene(scene, s, g)
        coverage[i, :len(cov)] = cov
    return images, coverage


def simulate_subject(out: Path, cfg: WorldConfig, seed: int, subject: int, feats, test_images: np.ndarray,
                     show_progress: bool) -> dict:
    """Draw a subject's cortex, run its sessions, write betas (z-scored per session) and tars."""
    cx = cortex_mod.build_cortex(cfg, seed, subject)
    drive = cortex_mod.image_drive(cx, feats, cfg.cortex)
    design = make_design(cfg, seed, subject, test_images)
    f, betas = writer.create_betas(out, subject, design.n_trials, cx.n_voxels)
    with f:
        sessions = range(1, design.n_sessions + 1)
        for session in tqdm(sessions, desc=f"subj{subject:02d} sessions", disable=not show_progress,
                            dynamic_ncols=True):
            rows = design.session_rows(session)
            raw = cortex_mod.session_responses(cx, drive, design.image[rows],
                                               cortex_mod.trial_rng(seed, subject, session), cfg.cortex)
            betas[rows] = writer.zscore_session(raw, design.is_test[rows])
    writer.write_subject_tars(out, design)
    np.save(layout.roi_path(out, subject), cx.roi, allow_pickle=False)
    return {"subject": subject, "voxels": cx.n_voxels, "trials": design.n_trials, "sessions": design.n_sessions,
            "test_trials": int(design.is_test.sum()),
            "roi_voxels": {name: int((cx.roi == k).sum()) for k, name in enumerate(layout.ROI_NAMES)}}


def preset_name(cfg: WorldConfig) -> str:
    """The preset a config is (whatever its seed), or "custom"."""
    return next((name for name, p in PRESETS.items() if p == dataclasses.replace(cfg, seed=p.seed)), "custom")


def generate_world(cfg: WorldConfig, out_dir: str | Path, *, seed: int | None = None, force: bool = False,
                   show_progress: bool = True) -> Path:
    """Generate a world into ``out_dir`` and return its path.

    ``seed`` overrides ``cfg.seed``. The same seed and config give byte-identical files.
    Refuses a non-empty ``out_dir`` unless ``force`` (then only world files are replaced).
    ``world/world.json`` is written last: its presence marks a complete world.
    """
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=int(seed))
    check_config(cfg)
    out = Path(out_dir)
    _prepare_out_dir(out, force)
    layout.world_dir(out).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    scenes = sample_scenes(cfg.seed, cfg.n_images)
    images, coverage = render_images(scenes, cfg, show_progress)
    test_images = choose_test_images(cfg, cfg.seed)
    writer.write_images(out, images)
    writer.write_captions(out, caption_array(scenes))
    test_set = set(test_images.tolist())
    _write_json(layout.image_params_path(out), {
        "categories": list(CATEGORIES), "colours": list(COLOUR_NAMES), "backgrounds": list(BACKGROUNDS),
        "test_images": test_images.tolist(),
        "images": [{**scene.to_dict(), "index": i, "is_test": i in test_set,
                    "main_category": CATEGORIES.index(scene.objects[0].category)}
                   for i, scene in enumerate(scenes)],
    })

    feats = cortex_mod.compute_features(images, coverage, scenes)
    subjects = [simulate_subject(out, cfg, cfg.seed, s, feats, test_images, show_progress) for s in cfg.subjects]
    _write_json(layout.world_info_path(out), {
        "format": WORLD_FORMAT, "preset": preset_name(cfg), "seed": cfg.seed, "config": to_dict(cfg),
        "image_size": cfg.image_size, "n_images": cfg.n_images, "n_train_images": cfg.n_train,
        "n_test_images": cfg.n_test, "trials_per_session": cfg.trials_per_session,
        "test_images": test_images.tolist(), "categories": list(CATEGORIES), "roi_names": list(layout.ROI_NAMES),
        "subjects": subjects,
    })
    if show_progress:
        tqdm.write(f"world written to {out} in {time.perf_counter() - started:.1f} s")
    return out


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def read_world_info(root: str | Path) -> dict:
    path = layout.world_info_path(root)
    if not path.exists():
        raise MindhierError(f"{path} not found: {root} is not a complete synthetic world "
                            f"(generate one with `mindhier world --out {root}`)")
    return json.loads(path.read_text())
