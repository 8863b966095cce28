"""`mindhier evaluate` and `evaluate_reconstructions`: values, n/a columns, inputs, tables."""

import io
import json
import sys
import tarfile

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mindhier.cli import main
from mindhier.data import layout
from mindhier.evaluate import EvaluationError, average_row, evaluate_reconstructions, load_ground_truth, subject_from_name
from mindhier.metrics import core, nets, suite


def rand_images(n, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def offline():
    """PixCorr, SSIM, Lite0 (both) and an n/a standard column."""
    return suite.pixel_metrics() + suite.lite0_metrics() + [suite.standard_metrics()[2]]


def test_identical_images_score_perfectly(offline):
    gts = rand_images(4)
    res = evaluate_reconstructions(gts.clone(), gts, offline)
    v = res["values"]
    assert v["pixcorr"] == pytest.approx(1.0) and v["ssim"] == pytest.approx(1.0)
    assert v["lite0_twoway"] == 1.0 and v["lite0_dist"] == pytest.approx(0.0, abs=1e-6)
    assert v["alex2"] is None and "alexnet" in res["unavailable"]["alex2"]
    assert res["n_images"] == 4 and [c["key"] for c in res["columns"]] == list(v)


def test_values_equal_the_core_functions_after_the_256_resize(offline):
    gts, recons = rand_images(4, 40, seed=1), rand_images(4, 48, seed=2)
    v = evaluate_reconstructions(recons, gts, offline[:2])["values"]
    g, r = core.resize(gts, 256), core.resize(recons, 256)
    assert v["pixcorr"] == pytest.approx(core.pixcorr(r, g)) and v["ssim"] == pytest.approx(core.ssim(r, g))


def test_mismatched_inputs_are_clear_errors(offline):
    gts = rand_images(4)
    with pytest.raises(EvaluationError, match="4 ground-truth"):
        evaluate_reconstructions(rand_images(3), gts, offline)
    with pytest.raises(EvaluationError, match=r"\(N, 3, H, W\)"):
        evaluate_reconstructions(torch.rand(4, 1, 32, 32), gts, offline)
    with pytest.raises(EvaluationError, match=r"\(x \+ 1\) / 2"):
        evaluate_reconstructions(gts * 2 - 1, gts, offline)


def test_all_standard_networks_are_wired_to_their_layers(monkeypatch):
    """Layer names, resizes and shapes of the four torchvision nets, with random weights that
    only this test injects (the suite itself never builds a net without a weight file)."""
    builders = {"alexnet": nets.build_alexnet, "inception_v3": nets.build_inception_v3,
                "efficientnet_b1": nets.build_efficientnet_b1, "swav_resnet50": nets.build_swav_resnet50}
    monkeypatch.setattr(nets, "find_weights", lambda d, net: f"<{net}>")
    monkeypatch.setattr(nets, "load_torchvision_net", lambda net, path: builders[net]().eval())
    metrics = {m.key: m for m in suite.standard_metrics(weights_dir="x")}
    expected = {"alex2": (256, 192 * 31 * 31), "alex5": (256, 256 * 15 * 15), "incep": (342, 2048),
                "eff": (255, 1280), "swav": (224, 2048)}
    images = core.to_eval_size(rand_images(2, 16))
    for key, (size, dim) in expected.items():
        assert metrics[key].resize == size
        assert metrics[key].features(images).shape == (2, dim), key
    assert metrics["eff"].kind == metrics["swav"].kind == "corrdist" and metrics["incep"].kind == "twoway"


# ------------------------------------------------------------------------------ command line


def write_tensor(path, key, x):
    save_file({key: x.contiguous()}, str(path))
    return path


def test_cli_writes_json_and_markdown_with_settings_rows_and_literature(tmp_path):
    gts = rand_images(5, seed=3)
    write_tensor(tmp_path / "gt.safetensors", "images", gts)
    write_tensor(tmp_path / "a.safetensors", "recons", gts.clone())
    write_tensor(tmp_path / "b.safetensors", "recons", (0.5 * gts + 0.5 * rand_images(5, seed=4)))
    out = tmp_path / "eval"
    argv = ["evaluate", "--recons", f"subj01={tmp_path / 'a.safetensors'}", "--recons",
            f"subj02={tmp_path / 'b.safetensors'}", "--images", str(tmp_path / "gt.safetensors"),
            "--setting", "averaging=voxels", "--setting", "sampling=single-shot", "--out", str(out)]
    assert main(argv) == 0
    res = json.loads((out / "metrics.json").read_text())
    rows = res["rows"]
    assert set(rows) == {"subj01", "subj02", "average"} and rows["subj01"]["pixcorr"] == pytest.approx(1.0)
    assert rows["average"]["pixcorr"] == pytest.approx((rows["subj01"]["pixcorr"] + rows["subj02"]["pixcorr"]) / 2)
    assert rows["average"]["alex2"] is None and rows["average"]["clip_ours"] is None
    assert res["setting"] == {"averaging": "voxels", "sampling": "single-shot", "subjects": "subj01, subj02"}
    md = (out / "metrics.md").read_text()
    assert "| averaging | voxels |" in md and "| split | not stated |" in md
    assert "subj01 (n=5)" in md and "**average** (2 subjects)" in md
    assert "*MindEye2 subj01, enhanced (published; not this run)* | 0.374 | 0.439 | 97.91% | 99.11%" in md
    assert "n/a" in md and "not comparable to EffNet-B1" in md and "--vision" in md
    # nothing is overwritten without --force
    assert main(argv) == 2
    assert main(argv + ["--force"]) == 0


def test_the_averaging_policy_is_read_from_reconstructs_settings_and_never_mixed(tmp_path, capsys):
    gts = rand_images(4, seed=1)
    write_tensor(tmp_path / "gt.safetensors", "images", gts)
    policies = {"outputs": "outputs", "voxels": "voxels", "old": "voxels averaged over repetitions before the encoder"}
    for folder, recorded in policies.items():   # "old": what reconstruct wrote before --averaging existed
        (tmp_path / folder).mkdir()
        write_tensor(tmp_path / folder / "recons.safetensors", "recons", gts.clone())
        (tmp_path / folder / "settings.json").write_text(json.dumps({"averaging": recorded}))

    def evaluate(out: str, *recons: str, setting: tuple = ()) -> int:
        pairs = [arg for i, folder in enumerate(recons)
                 for arg in ("--recons", f"subj0{i + 1}={tmp_path / folder / 'recons.safetensors'}")]
        return main(["evaluate", *pairs, "--images", str(tmp_path / "gt.safetensors"), "--out", str(tmp_path / out),
                     *[a for kv in setting for a in ("--setting", kv)]])

    assert evaluate("e1", "outputs") == 0
    assert json.loads((tmp_path / "e1" / "metrics.json").read_text())["setting"]["averaging"] == "outputs"
    assert evaluate("e2", "voxels", "old") == 0
    assert "| averaging | voxels |" in (tmp_path / "e2" / "metrics.md").read_text()
    capsys.readouterr()
    assert evaluate("e3", "outputs", "voxels") == 2
    assert "mix the two averaging policies (subj01: outputs; subj02: voxels)" in capsys.readouterr().err
    assert evaluate("e4", "outputs", setting=("averaging=voxels",)) == 2
    assert ("--setting averaging=voxels, but settings.json beside the reconstructions records averaging=outputs"
            in capsys.readouterr().err)
    assert not (tmp_path / "e3").exists() and not (tmp_path / "e4").exists()


def test_cli_rejects_a_count_mismatch_with_the_files_named(tmp_path, capsys):
    write_tensor(tmp_path / "gt.safetensors", "images", rand_images(5))
    write_tensor(tmp_path / "r.safetensors", "recons", rand_images(4))
    code = main(["evaluate", "--recons", str(tmp_path / "r.safetensors"), "--images",
                 str(tmp_path / "gt.safetensors"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "r.safetensors: 4 reconstructions" in err and "ascending image order" in err


def make_data_root(root, test_images=(5, 2, 5, 7, 2, 5), n_images=10):
    images = np.random.default_rng(0).random((n_images, 3, 16, 16)).astype(np.float16)
    with h5py.File(layout.images_hdf5_path(root), "w") as f:
        f.create_dataset(layout.IMAGES_DATASET, data=images)
    tar_path = layout.test_tar_path(root, 1)
    tar_path.parent.mkdir(parents=True)
    with tarfile.open(tar_path, "w") as tar:
        for i, image in enumerate(test_images):
            behav = -np.ones((1, layout.BEHAV_COLUMNS), np.float64)
            behav[0, layout.COL_IMAGE], behav[0, layout.COL_TRIAL] = image, 100 + i
            buf = io.BytesIO()
            np.save(buf, behav)
            info = tarfile.TarInfo(f"sample{i:09d}.behav.npy")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    return torch.from_numpy(images.astype(np.float32))


def test_ground_truth_from_a_data_root_is_the_sorted_unique_test_images(tmp_path):
    all_images = make_data_root(tmp_path)
    gts = load_ground_truth(tmp_path, 1)
    assert torch.equal(gts, all_images[[2, 5, 7]])
    with pytest.raises(EvaluationError, match="subj01=RECONS"):
        load_ground_truth(tmp_path, None)
    write_tensor(tmp_path / "r.safetensors", "recons", gts)
    out = tmp_path / "o"
    assert main(["evaluate", "--recons", f"subj01={tmp_path / 'r.safetensors'}", "--images", str(tmp_path),
                 "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["rows"]["subj01"]["ssim"] == pytest.approx(1.0)


def test_subject_names():
    assert [subject_from_name(s) for s in ("subj01", "subj7", "sub-05", "s2", "all")] == [1, 7, 5, 2, None]


def test_average_row_is_none_when_any_subject_lacks_a_value():
    assert average_row({"a": {"x": 1.0, "y": None}, "b": {"x": 3.0, "y": 2.0}}) == {"x": 2.0, "y": None}


def test_vision_checkpoint_adds_in_project_clip_two_way(tmp_path, monkeypatch):
    class FakeVision:
        def image_embedding(self, images01):
            return images01.mean(dim=(2, 3)) + images01[:, :, :4, :4].flatten(1)[:, :3]

    fake_module = type(sys)("mindhier.vision")
    fake_module.load_vision = lambda path: FakeVision()
    monkeypatch.setitem(sys.modules, "mindhier.vision", fake_module)
    gts = rand_images(4, seed=5)
    write_tensor(tmp_path / "gt.safetensors", "images", gts)
    write_tensor(tmp_path / "r.safetensors", "recons", gts)
    out = tmp_path / "o"
    assert main(["evaluate", "--recons", str(tmp_path / "r.safetensors"), "--images", str(tmp_path / "gt.safetensors"),
                 "--vision", "ckpt", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["rows"]["all"]["clip_ours"] == 1.0


def test_missing_vision_module_is_not_available_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mindhier.vision", None)  # import of it raises ImportError
    gts = rand_images(3, seed=6)
    write_tensor(tmp_path / "gt.safetensors", "images", gts)
    write_tensor(tmp_path / "r.safetensors", "recons", gts)
    out = tmp_path / "o"
    assert main(["evaluate", "--recons", str(tmp_path / "r.safetensors"), "--images", str(tmp_path / "gt.safetensors"),
                 "--vision", "ckpt", "--out", str(out)]) == 0
    res = json.loads((out / "metrics.json").read_text())
    assert res["rows"]["all"]["clip_ours"] is None and "load_vision" in res["unavailable"]["clip_ours"]


def test_recons_from_a_png_folder_and_a_pt_file(tmp_path):
    from PIL import Image
    from mindhier.evaluate import load_recons
    gts = (rand_images(3, 8, seed=7) * 255).round() / 255
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(gts):
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"{i:04d}.png")
    assert torch.allclose(load_recons(folder), gts, atol=1e-6)
    torch.save({"recons": gts}, tmp_path / "r.pt")
    assert torch.equal(load_recons(tmp_path / "r.pt"), gts)


def test_vision_flag_works_with_a_real_small_clip_checkpoint(tmp_path):
    small_clip = pytest.importorskip("mindhier.vision.small_clip")
    torch.manual_seed(0)
    vocab = list(small_clip.SPECIALS) + ["red", "disc"]
    cfg = small_clip.resolve_config(small_clip.PRESETS["tiny"], vocab)
    small_clip.save_small_clip(tmp_path / "vision", small_clip.SmallClipModel(cfg), vocab)
    gts = rand_images(4, seed=8)
    write_tensor(tmp_path / "gt.safetensors", "images", gts)
    write_tensor(tmp_path / "r.safetensors", "recons", gts)
    out = tmp_path / "o"
    assert main(["evaluate", "--recons", str(tmp_path / "r.safetensors"), "--images", str(tmp_path / "gt.safetensors"),
                 "--vision", str(tmp_path / "vision"), "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["rows"]["all"]["clip_ours"] == 1.0


def test_cli_refuses_a_weight_file_that_is_not_the_published_one(tmp_path, capsys, monkeypatch):
    gts = rand_images(3, seed=5)
    write_tensor(tmp_path / "gt.safetensors", "images", gts)
    write_tensor(tmp_path / "r.safetensors", "recons", gts.clone())
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.save({"features.0.weight": torch.zeros(2)}, weights / "alexnet-owt-7be5be79.pth")  # not AlexNet's bytes
    argv = ["evaluate", "--recons", f"subj01={tmp_path / 'r.safetensors'}", "--images",
            str(tmp_path / "gt.safetensors"), "--weights-dir", str(weights), "--out", str(tmp_path / "e")]
    assert main(argv) == 2
    assert "alexnet-owt-7be5be79.pth" in capsys.readouterr().err
    seen = []
    real = suite.default_metrics
    monkeypatch.setattr(suite, "default_metrics",
                        lambda *a, **kw: seen.append(kw["allow_unpublished"]) or real(None, None, *a[2:], **kw))
    assert main(argv + ["--allow-unpublished-weights", "--force"]) == 0
    assert seen == [True]


def test_shared_reference_features_give_the_same_values_and_run_the_ground_truth_once():
    calls = []

    def extractor(x):
        calls.append(len(x))
        return x.mean(dim=(2, 3))

    metric = suite.FeatureMetric("toy", "toy", "twoway", extractor=extractor)
    torch.manual_seed(0)
    gts = torch.rand(6, 3, 16, 16)
    rows = [torch.rand(6, 3, 16, 16) for _ in range(3)]
    alone = [evaluate_reconstructions(r, gts, metrics=[metric])["values"]["toy"] for r in rows]
    calls.clear()
    reference = suite.ReferenceFeatures()
    shared = [evaluate_reconstructions(r, gts, metrics=[metric], reference=reference)["values"]["toy"] for r in rows]
    assert shared == alone
    assert sum(calls) == 6 * (1 + 3)  # the ground truth once, each row once
    with pytest.raises(ValueError, match="other ground-truth images"):
        evaluate_reconstructions(rows[0], torch.rand(6, 3, 16, 16), metrics=[metric], reference=reference)
