"""`mindhier interpret` (paper appendix D): cross-validated ridge from each block to each voxel,
per-area summaries, the areas of a world and of NSD label volumes, and the command end to end."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from mindhier.cli import main
from mindhier.data import layout
from mindhier.interpret import (best_blocks, block_scores, cross_validated_predictions, held_out_r, make_folds,
                                pearson_columns, summarise_areas, target_splits)
from mindhier.interpret_areas import AreaError, Areas, nsd_areas, world_areas, world_layout
from mindhier.vision.small_clip import PRESETS as CLIP_PRESETS
from mindhier.vision.small_clip import SmallClipModel, build_vocab, resolve_config, save_small_clip
from mindhier.world import PRESETS as WORLD_PRESETS
from mindhier.world import generate_world


# ---------------------------------------------------------------- a constructed case with a known answer

def constructed(n=200, p=40, per_block=30, blocks=3, noise=1.0, seed=0):
    """Independent features per block; voxel group b is driven by block b's features only."""
    rng = np.random.default_rng(seed)
    feats = {f"b{k}": rng.normal(size=(n, p)) for k in range(blocks)}
    y = np.concatenate([feats[f"b{k}"] @ rng.normal(size=(p, per_block)) / np.sqrt(p)
                        + noise * rng.normal(size=(n, per_block)) for k in range(blocks)], axis=1)
    truth = np.repeat(np.arange(blocks), per_block)
    return feats, y, truth


def test_voxels_driven_by_one_block_are_assigned_to_that_block():
    feats, y, truth = constructed()
    folds = make_folds(len(y), 5)
    scores = block_scores([feats], [y], folds)
    best = best_blocks(scores, list(feats), threshold=1.96 / np.sqrt(len(y)))
    assert np.mean(best == truth + 1) >= 0.95
    # a block's r is high on its own voxels and near zero elsewhere
    r = np.stack([scores[b] for b in feats])
    for k in range(3):
        own = truth == k
        assert r[k, own].mean() > 0.5 and abs(r[k, ~own].mean()) < 0.05
    # as areas ordered by block, the best block rises and ranks agree perfectly
    areas = Areas(truth, ["first", "second", "third"], [0, 1, 2], "constructed")
    summary = summarise_areas(scores, list(feats), areas, len(y))
    assert summary["best_block_rises"] and summary["spearman_area_vs_best_block"] > 0.9
    assert summary["areas"]["second"]["wins"]["b1"] > 0.9
    # reversed order: the index falls, and the summary says so
    reversed_areas = Areas(truth, ["first", "second", "third"], [2, 1, 0], "constructed")
    falls = summarise_areas(scores, list(feats), reversed_areas, len(y))
    assert not falls["best_block_rises"] and falls["spearman_area_vs_best_block"] < -0.9


def test_held_out_predictions_do_not_see_the_fold_they_predict():
    # p >> n: a ridge fitted on the predicted rows would reproduce pure noise; held out it cannot
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(120, 2000)), rng.normal(size=(120, 50))
    folds = make_folds(120, 4)
    r = held_out_r(x, y, folds)
    assert abs(r.mean()) < 0.05 and np.abs(r).max() < 0.4
    # r over the concatenated folds would be biased low by each fold's intercept: held_out_r is not
    concatenated = pearson_columns(cross_validated_predictions(x, y, folds), y)
    assert concatenated.mean() < r.mean() - 0.05
    # changing one fold's targets changes no prediction of that fold's rows
    y2 = y.copy()
    y2[folds[0]] = rng.normal(size=(len(folds[0]), 50)) * 10
    a = cross_validated_predictions(x, y, folds)
    b = cross_validated_predictions(x, y2, folds)
    np.testing.assert_allclose(a[folds[0]], b[folds[0]])
    assert not np.allclose(a[folds[1]], b[folds[1]])


def test_folds_cover_every_image_once_and_bad_counts_are_refused():
    folds = make_folds(23, 5, seed=3)
    assert sorted(np.concatenate(folds).tolist()) == list(range(23))
    with pytest.raises(ValueError, match="--folds"):
        make_folds(10, 1)


def test_held_out_repetition_never_feeds_the_target_repetition_to_the_encoder():
    voxels = np.stack([np.full((4, 6), float(r)) for r in range(3)], axis=1)  # (N, 3, V), rep r = r
    splits = target_splits(voxels, "held-out-repetition")
    assert len(splits) == 3
    for j, (x, y) in enumerate(splits):
        assert np.all(y == j) and np.allclose(x, (3 - j) / 2)  # mean of the other two
    (x, y), = target_splits(voxels, "average")
    assert np.allclose(x, 1) and np.allclose(y, 1)


# ---------------------------------------------------------------- areas

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(WORLD_PRESETS["tiny"], tmp_path_factory.mktemp("interpret") / "tiny", show_progress=False)


def test_world_areas_and_layout(world):
    areas = world_areas(world, 1)
    saved = np.load(world / "world" / "subj01_roi.npy")
    assert np.array_equal(areas.label, saved) and areas.names == ["early", "mid", "high"]
    xy, how = world_layout(world, 1, areas)
    assert xy.shape == (len(saved), 2) and "receptive field" in how
    for k in range(3):  # each area in its own panel
        assert np.all((xy[areas.members(k), 0] >= k * 1.15) & (xy[areas.members(k), 0] <= k * 1.15 + 1))
    # labels that the world's own config does not give back: no layout, rather than a wrong one
    other = Areas(np.roll(areas.label, 1), areas.names, areas.rank, "shifted")
    assert world_layout(world, 1, other) is None
    with pytest.raises(AreaError, match="--rois"):
        world_areas(world.parent, 1)


def test_nsd_labels_are_read_at_the_mask_voxels_in_c_order(tmp_path):
    rng = np.random.default_rng(0)
    mask = (rng.random((5, 6, 4)) > 0.5).astype(np.int16)
    mask[mask == 0] = -1  # nsdgeneral: -1 outside the brain, 0 outside the mask, 1 inside
    streams = rng.integers(0, 8, size=mask.shape).astype(np.int16)
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "nsdgeneral.nii.gz")
    nib.save(nib.Nifti1Image(streams, np.eye(4)), tmp_path / "streams.nii.gz")
    inside = mask >= 1
    areas = nsd_areas(tmp_path / "streams.nii.gz", tmp_path / "nsdgeneral.nii.gz", int(inside.sum()))
    values = streams[inside]  # numpy's boolean indexing: C order, as prepare-nsd wrote the betas
    names = {1: "early", 2: "midventral", 3: "midlateral", 4: "midparietal", 5: "ventral", 6: "lateral",
             7: "parietal"}
    got = [areas.names[k] if k >= 0 else None for k in areas.label]
    assert got == [names.get(int(v)) for v in values]
    assert areas.rank[areas.names.index("early")] == 0 and areas.rank[areas.names.index("ventral")] == 2
    with pytest.raises(AreaError, match="selects"):
        nsd_areas(tmp_path / "streams.nii.gz", tmp_path / "nsdgeneral.nii.gz", int(inside.sum()) + 1)
    nib.save(nib.Nifti1Image(streams, np.eye(4)), tmp_path / "labels.nii.gz")
    with pytest.raises(AreaError, match="--roi-kind"):
        nsd_areas(tmp_path / "labels.nii.gz", tmp_path / "nsdgeneral.nii.gz", int(inside.sum()))
    prf = nsd_areas(tmp_path / "labels.nii.gz", tmp_path / "nsdgeneral.nii.gz", int(inside.sum()), "prf-visualrois")
    assert prf.names == ["V1", "V2", "V3", "hV4"]


# ---------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def encoder(world, tmp_path_factory):
    base = tmp_path_factory.mktemp("interpret_run")
    torch.manual_seed(0)
    vocab = build_vocab(np.load(layout.captions_path(world)).ravel().tolist())
    save_small_clip(base / "vision" / "vision", SmallClipModel(resolve_config(CLIP_PRESETS["tiny"], vocab)), vocab)
    assert main(["train-encoder", "--data", str(world), "--subject", "1", "--vision", str(base / "vision"),
                 "--out", str(base / "enc"), "--preset", "tiny", "--epochs", "1", "--global-batch", "32",
                 "--precision", "fp32", "--target-cache", str(base / "targets")]) == 0
    return base


def test_the_command_writes_every_voxels_scores_tables_and_pictures(world, encoder, capsys):
    out = encoder / "out"
    assert main(["interpret", "--data", str(world), "--subject", "1", "--encoder", str(encoder / "enc" / "encoder"),
                 "--vision", str(encoder / "vision"), "--out", str(out), "--folds", "4", "--quiet"]) == 0
    summary = json.loads((out / "interpret.json").read_text())
    voxels = np.load(out / "voxels.npz")
    n_vox = len(np.load(world / "world" / "subj01_roi.npy"))
    assert summary["targets"] == "held-out-repetition" and summary["images"] == 20
    assert set(summary["models"]) == {"encoder", "vision"}
    enc = summary["models"]["encoder"]
    assert enc["blocks"] == ["e_1", "e_2", "e_3", "e_4", "final"] and enc["ranked_blocks"] == ["e_1", "e_2", "e_3", "e_4"]
    assert summary["models"]["vision"]["blocks"] == [f"layer {g}" for g in summary["encoder_layers"]]
    for block in enc["blocks"]:
        r = voxels[f"encoder/r/{block}"]
        assert r.shape == (n_vox,) and np.all(np.abs(r) <= 1)
        for k, area in enumerate(summary["area_names"]):  # the table is the mean of the per-voxel file
            assert enc["areas"][area]["mean_r"][block]["mean"] == pytest.approx(
                float(r[voxels["area_label"] == k].mean()), abs=1e-5)
    best = voxels["encoder/best_block"]
    assert best.shape == (n_vox,) and set(np.unique(best)) <= {0, 1, 2, 3, 4}
    for name in ("interpret.md", "heatmap.png", "best_block_map.png"):
        assert (out / name).stat().st_size > 0
    text = capsys.readouterr().out
    assert "Best block among e_1, e_2, e_3, e_4" in text and "held-out-repetition" in text
    # the paper's reading shares trial noise between features and targets: other numbers, labelled
    assert main(["interpret", "--data", str(world), "--subject", "1", "--encoder", str(encoder / "enc" / "encoder"),
                 "--out", str(encoder / "avg"), "--targets", "average", "--features", "pooled", "--quiet"]) == 0
    avg = json.loads((encoder / "avg" / "interpret.json").read_text())
    assert avg["targets"] == "average" and avg["features"] == "pooled" and set(avg["models"]) == {"encoder"}
    assert "share trial noise" in (encoder / "avg" / "interpret.md").read_text()


def test_bad_requests_are_refused_with_the_fix(world, encoder, capsys):
    enc = str(encoder / "enc" / "encoder")
    assert main(["interpret", "--data", str(world), "--subject", "1", "--encoder", enc, "--out",
                 str(encoder / "x"), "--rois", "streams.nii.gz"]) == 2
    assert "--rois and --nsdgeneral go together" in capsys.readouterr().err
    assert main(["interpret", "--data", str(world), "--subject", "2", "--encoder", enc, "--out", str(encoder / "y")]) == 2
    assert "voxels" in capsys.readouterr().err  # subject 2's betas do not fit subject 1's encoder


# ---------------------------------------------------------------- over runs

def fake_run(folder, subject, supervision, seed, means, targets="held-out-repetition"):
    steps = [{"rank": k, "areas": [name], "best_block_index": {"mean": m, "low": m - 0.1, "high": m + 0.1, "n": 50}}
             for k, (name, m) in enumerate(zip(["early", "mid", "high"], means))]
    model = {"by_rank": steps, "best_block_rises": all(a < b for a, b in zip(means, means[1:])),
             "spearman_area_vs_best_block": 0.2}
    folder.mkdir(parents=True)
    (folder / "interpret.json").write_text(json.dumps({
        "subject": subject, "encoder_supervision": supervision, "encoder_seed": seed, "targets": targets,
        "features": "tokens", "models": {"encoder": model}}))
    return str(folder)


def test_the_summary_gives_margins_seed_spread_and_refuses_a_mix(tmp_path, capsys):
    runs = [fake_run(tmp_path / "a", 1, "hierarchical", 0, [2.0, 2.5, 3.0]),
            fake_run(tmp_path / "b", 1, "hierarchical", 1, [2.0, 2.2, 2.6]),
            fake_run(tmp_path / "c", 2, "hierarchical", 0, [2.5, 2.4, 2.3]),
            fake_run(tmp_path / "d", 1, "final-only", 0, [2.0, 2.0, 2.1])]
    assert main(["interpret-summary", *runs, "--out", str(tmp_path / "sum")]) == 0
    stats = json.loads((tmp_path / "sum" / "summary.json").read_text())["by_supervision"]
    s1 = stats["hierarchical"]["subjects"]["1"]
    assert s1["margins"] == pytest.approx([1.0, 0.6]) and s1["sd"] == pytest.approx(np.std([1.0, 0.6], ddof=1))
    assert stats["hierarchical"]["subjects"]["2"]["mean"] == pytest.approx(-0.2)
    assert stats["hierarchical"]["positive_in"] == 1 and stats["hierarchical"]["of"] == 2
    assert stats["final-only"]["mean_over_subjects"] == pytest.approx(0.1)
    assert (tmp_path / "sum" / "best_block_by_area.png").stat().st_size > 0
    assert "| 2 | hierarchical | 0 | 2.50 → 2.40 → 2.30 | -0.20 | no |" in capsys.readouterr().out
    other = fake_run(tmp_path / "e", 1, "hierarchical", 2, [2, 3, 4], targets="average")
    assert main(["interpret-summary", runs[0], other, "--out", str(tmp_path / "mix")]) == 2
    assert "summarise like with like" in capsys.readouterr().err
