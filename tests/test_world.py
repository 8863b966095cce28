"""Synthetic world: determinism, exact MindEye2 layout, captions, cortex ROIs, report."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from mindhier import cli
from mindhier.config import ConfigError, from_dict
from mindhier.data import layout
from mindhier.world import PRESETS, WorldConfig, WorldExistsError, generate_world
from mindhier.world.generate import check_config
from mindhier.world.images import (CATEGORIES, BackgroundSpec, ObjectSpec, SceneSpec, captions, render_scene,
                                   sample_scenes)
from mindhier.world.report import Ridge, analyse, load_subject, pixcorr, split_half, subject_report

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return generate_world(TINY, tmp_path_factory.mktemp("world") / "tiny", show_progress=False)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _read_tar(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Independent tar reader: key -> {member suffix: array}."""
    samples: dict[str, dict[str, np.ndarray]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, _, suffix = m.name.partition(".")
            samples.setdefault(key, {})[suffix] = np.load(io.BytesIO(tar.extractfile(m).read()), allow_pickle=False)
    return samples


def _all_behav(root: Path, subject: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Behav rows per training tar (list, tar i = session i+1) and of the test tar."""
    train_dir = layout.train_tar_path(root, subject, 0).parent
    n_tars = len(list(train_dir.glob("*.tar")))
    train = [np.concatenate([s["behav.npy"] for s in _read_tar(layout.train_tar_path(root, subject, i)).values()])
             for i in range(n_tars)]
    test = np.concatenate([s["behav.npy"] for s in _read_tar(layout.test_tar_path(root, subject)).values()])
    return train, test


# ---------------------------------------------------------------- determinism

def test_same_seed_gives_identical_files_and_other_seed_differs(world, tmp_path):
    again = generate_world(TINY, tmp_path / "again", show_progress=False)
    assert _digests(again) == _digests(world)
    other = generate_world(TINY, tmp_path / "other", seed=7, show_progress=False)
    a, b = _digests(world), _digests(other)
    for name in ("coco_images_224_float16.hdf5", "betas_all_subj01_fp32_renorm.hdf5", "COCO_73k_annots_curated.npy"):
        assert a[name] != b[name], name
    assert json.loads(layout.world_info_path(other).read_text())["seed"] == 7


def test_presets_are_valid_and_nsd_like():
    for name, cfg in PRESETS.items():
        check_config(cfg)
        assert cfg.trials_per_session <= 750 and len(CATEGORIES) >= 10, name
    assert PRESETS["demo"].subjects == PRESETS["large"].subjects == (1, 2, 5, 7)
    assert PRESETS["tiny"].subjects == (1, 2)
    large = PRESETS["large"]  # NSD's design: 40 sessions of 750 trials
    assert 3 * large.n_images == 40 * large.trials_per_session and large.fewer_reps_fraction == 0
    with pytest.raises(ConfigError, match="trials_per_session"):
        check_config(WorldConfig(trials_per_session=751))


def test_scene_sampling_is_per_index():
    # image i does not depend on how many images come before or after it
    assert sample_scenes(3, 10)[7] == sample_scenes(3, 8)[7]
    assert sample_scenes(3, 10)[7] != sample_scenes(4, 10)[7]


# ---------------------------------------------------------------- layout

def test_files_datasets_and_shapes(world):
    info = json.loads(layout.world_info_path(world).read_text())
    assert from_dict(WorldConfig, info["config"]) == TINY
    assert info["preset"] == "tiny" and info["trials_per_session"] == TINY.trials_per_session <= 750
    n, s = TINY.n_images, TINY.image_size
    with h5py.File(layout.images_hdf5_path(world)) as f:
        images = f[layout.IMAGES_DATASET][:]
    assert images.shape == (n, 3, s, s) and images.dtype == np.float16
    assert images.min() >= 0 and images.max() <= 1 and images.astype(np.float32).std() > 0.1
    assert layout.subjects_in(world) == list(TINY.subjects)
    for subject in TINY.subjects:
        roi = np.load(layout.roi_path(world, subject), allow_pickle=False)
        with h5py.File(layout.betas_path(world, subject)) as f:
            betas = f[layout.BETAS_DATASET]
            assert betas.dtype == np.float32 and betas.shape[1] == len(roi)
            assert np.isfinite(betas[:]).all()
        assert roi.dtype == np.int8 and set(np.unique(roi)) == {0, 1, 2}
    # NSD-like voxel counts: they differ per subject, in NSD's order (subj01 > subj02)
    counts = [s["voxels"] for s in info["subjects"]]
    assert counts[0] > counts[1] and 100 < counts[1]


def test_behav_columns_splits_and_repetitions(world):
    info = json.loads(layout.world_info_path(world).read_text())
    tps = info["trials_per_session"]
    for subject in TINY.subjects:
        with h5py.File(layout.betas_path(world, subject)) as f:
            n_trials = f[layout.BETAS_DATASET].shape[0]
        train, test = _all_behav(world, subject)
        assert all(b.shape[1] == layout.BEHAV_COLUMNS for b in train + [test])
        rows = np.concatenate([b[:, layout.COL_TRIAL] for b in train] + [test[:, layout.COL_TRIAL]])
        assert len(rows) == n_trials and np.array_equal(np.sort(rows), np.arange(n_trials))  # every row once
        for i, b in enumerate(train):  # tar i holds session i+1's training trials only
            assert (b[:, layout.COL_SHARED] == 0).all()
            assert (b[:, layout.COL_TRIAL] // tps == i).all() and (b[:, 2] == i + 1).all()
            assert len(b) <= tps <= 750
        assert (test[:, layout.COL_SHARED] == 1).all()
        test_counts = Counter(test[:, layout.COL_IMAGE].astype(int).tolist())
        assert set(test_counts.values()) == {3} and len(test_counts) == TINY.n_test
        assert sorted(test_counts) == info["test_images"]
        train_counts = Counter(np.concatenate(train)[:, layout.COL_IMAGE].astype(int).tolist())
        assert max(train_counts.values()) <= 3 and not set(train_counts) & set(test_counts)
        assert len(train_counts) == TINY.n_train


def test_sample_members_and_keys(world):
    samples = _read_tar(layout.test_tar_path(world, 1))
    key, sample = next(iter(samples.items()))
    assert key == f"sample{int(sample['behav.npy'][0, layout.COL_TRIAL]):09d}"
    assert set(sample) == {"behav.npy", "past_behav.npy", "future_behav.npy", "olds_behav.npy"}
    assert sample["behav.npy"].shape == (1, 17)
    assert sample["past_behav.npy"].shape == sample["future_behav.npy"].shape == (8, 17)
    assert sample["olds_behav.npy"].shape == (2, 17)
    # olds rows are earlier showings of the same image
    for s in samples.values():
        olds = s["olds_behav.npy"]
        shown = olds[olds[:, 0] >= 0]
        assert (shown[:, 0] == s["behav.npy"][0, 0]).all()
        assert (shown[:, layout.COL_TRIAL] < s["behav.npy"][0, layout.COL_TRIAL]).all()
        assert len(shown) == s["behav.npy"][0, 14]  # repetition column


def test_betas_zscored_per_session_on_training_trials(world):
    tps = TINY.trials_per_session
    train, test = _all_behav(world, 1)
    with h5py.File(layout.betas_path(world, 1)) as f:
        betas = f[layout.BETAS_DATASET][:]
    for i, b in enumerate(train):
        x = betas[b[:, layout.COL_TRIAL].astype(int)]
        np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-4)
        np.testing.assert_allclose(x.std(axis=0), 1, atol=1e-3)
    assert (test[:, layout.COL_TRIAL] // tps).max() >= 1  # test trials spread over sessions


def test_captions_file(world):
    caps = np.load(layout.captions_path(world), allow_pickle=False)
    params = json.loads(layout.image_params_path(world).read_text())
    assert caps.shape == (TINY.n_images, 5) and caps.dtype.kind == "U"
    for row, p in zip(caps, params["images"]):
        filled = [c for c in row if c]
        assert len(filled) >= 3 and len(set(filled)) == len(filled)
        main = p["objects"][0]["category"]
        assert all(main in c for c in filled)
        assert CATEGORIES[p["main_category"]] == main
    assert sorted(i["index"] for i in params["images"] if i["is_test"]) == params["test_images"]


# ---------------------------------------------------------------- images and captions

def _scene(*objects, kind="stripes", colour="green"):
    return SceneSpec(BackgroundSpec(kind, colour, colour, 0.0, 0.2, 1), tuple(objects))


def test_caption_from_parameters():
    star = ObjectSpec("star", "red", "large", 0.5, 0.3, 0.0, "plain")
    ring = ObjectSpec("ring", "blue", "small", 0.5, 0.8, 0.0, "plain")
    caps = captions(_scene(star, ring))
    assert caps[0] == "a large red star above a small blue ring on green stripes"
    assert "little blue ring below it" in caps[1]
    assert len(set(caps)) == len(caps) >= 3


def test_render_draws_the_object_where_it_is():
    disc = ObjectSpec("disc", "red", "large", 0.25, 0.75, 0.0, "plain")
    image, coverage = render_scene(_scene(disc, kind="plain", colour="blue"), 32, 16)
    assert image.shape == (32, 32, 3) and coverage.shape == (1, 16, 16)
    assert image[24, 8, 0] > 0.8 and image[24, 8, 2] < 0.2  # red at the disc centre
    assert image[4, 28, 2] > 0.6  # blue background far from it
    area = np.pi * (0.9 * 0.24) ** 2 * 16 * 16  # disc of radius 0.9 object units
    assert coverage.sum() == pytest.approx(area, rel=0.05)
    # an object drawn on top hides what is under it
    square = ObjectSpec("square", "yellow", "medium", 0.25, 0.75, 0.0, "plain")
    _, cov = render_scene(_scene(square, disc), 32, 16)
    assert cov[1].sum() < coverage.sum() - 0.9 * cov[0].sum()


# ---------------------------------------------------------------- overwrite and CLI

def test_refuses_to_overwrite_and_force_replaces_world_files(tmp_path, capsys):
    out = tmp_path / "w"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    small = dict(TINY.__dict__, n_train=30, n_test=6, subjects=(1,))
    cfg = WorldConfig(**small)
    with pytest.raises(WorldExistsError, match="--force"):
        generate_world(cfg, out, show_progress=False)
    generate_world(cfg, out, force=True, show_progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    assert layout.subjects_in(out) == [1]
    # the CLI says the same without a traceback
    assert cli.main(["world", "--preset", "tiny", "--out", str(out), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err


def test_cli_generates_and_summarises(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli.main(["world", "--preset", "tiny", "--out", str(out), "--seed", "2", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "subj01" in text and "subj02" in text and "seed 2" in text


# ---------------------------------------------------------------- report

def test_ridge_matches_closed_form_and_brute_force_loo():
    rng = np.random.default_rng(0)
    for n, p in ((40, 12), (15, 30)):  # primal and kernel paths
        x, y = rng.normal(size=(n, p)), rng.normal(size=(n, 3))
        ridge = Ridge(x)
        alpha = 0.5 * ridge.scale
        xc, yc = x - x.mean(0), y - y.mean(0)
        w = np.linalg.solve(xc.T @ xc + alpha * np.eye(p), xc.T @ yc)
        x_new = rng.normal(size=(5, p))
        np.testing.assert_allclose(ridge.predictor(y, 0.5)(x_new), (x_new - x.mean(0)) @ w + y.mean(0), atol=1e-4)
        kernel = ridge.predictions(x_new, y, [0.5, 2.0])  # the kernel form, several penalties at once
        np.testing.assert_allclose(kernel[0.5], (x_new - x.mean(0)) @ w + y.mean(0), atol=1e-8)
        np.testing.assert_allclose(kernel[2.0], ridge.predictor(y, 2.0)(x_new), atol=1e-4)
        loo = ridge.loo_predictions(y, [0.5])[0.5]
        for i in (0, 3):  # leave row i out of everything, centring included, same penalty
            keep = np.arange(n) != i
            xk, yk = x[keep], y[keep]
            xkc, ykc = xk - xk.mean(0), yk - yk.mean(0)
            wi = np.linalg.solve(xkc.T @ xkc + alpha * np.eye(p), xkc.T @ ykc)
            np.testing.assert_allclose(loo[i], (x[i] - xk.mean(0)) @ wi + yk.mean(0), atol=1e-6)


def test_split_half_and_pixcorr_known_answers():
    rng = np.random.default_rng(1)
    signal = rng.normal(size=(400, 5))
    images = np.repeat(np.arange(400), 3)
    trials = signal[images] + rng.normal(size=(1200, 5))  # signal var 1, noise var 1
    expected = 1 / np.sqrt(2 * 1.5)  # r(s + n, s + (n2 + n3)/2)
    np.testing.assert_allclose(split_half(images, trials), expected, atol=0.08)
    a = rng.normal(size=(4, 50))
    assert pixcorr(a, a) == pytest.approx(1.0) and pixcorr(a, -a) == pytest.approx(-1.0)


def test_report_on_tiny_world(world):
    r = subject_report(world, 1)
    flat = [*r["reliability"].values(), *r["category_accuracy"].values(), *r["pixcorr"].values()]
    assert np.isfinite(flat).all()
    assert all(v > 0.1 for v in r["reliability"].values())
    acc = r["category_accuracy"]
    assert acc["high"] > max(acc["early"], 2 * r["category_chance"])
    pix = r["pixcorr"]
    assert pix["early"] > pix["high"] + 0.05 and pix["early"] > pix["mean_image"] + 0.08


def test_report_detects_a_broken_cortex(world):
    """Shuffle which image each training trial showed: decoding must fall to chance level."""
    data = load_subject(world, 1)
    rng = np.random.default_rng(0)
    data["train_trial_images"] = rng.permutation(data["train_trial_images"])
    r = analyse(data)
    assert r["category_accuracy"]["high"] <= 0.3
    assert r["pixcorr"]["early"] < r["pixcorr"]["mean_image"] + 0.04


def test_report_cli_writes_json(world, capsys):
    assert cli.main(["world", "--report", str(world), "--subject", "2"]) == 0
    assert "subject 2" in capsys.readouterr().out
    saved = json.loads((layout.world_dir(world) / "report.json").read_text())
    assert list(saved["subjects"]) == ["2"]
    assert cli.main(["world", "--report", str(world), "--subject", "3"]) == 2
