"""The evaluation arithmetic against independent computations, and the feature networks'
weight handling (SPEC §6). Small inputs only: everything runs in seconds on one CPU thread."""

import sys

import numpy as np
import pytest
import scipy.spatial.distance
import skimage.data
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from mindhier.metrics import core, nets, suite
from mindhier.metrics.tv import import_torchvision


def rand_images(n, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ resizes


def test_resize_is_plain_bilinear_without_antialias():
    x = rand_images(2, 64)
    down = core.resize(x, 20)
    assert torch.allclose(down, F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False))
    # antialiasing would have averaged more pixels: it must not be what we do
    assert not torch.allclose(down, F.interpolate(x, size=(20, 20), mode="bilinear", antialias=True))


def test_resize_matches_torchvision_transforms_resize_with_antialias_off():
    import_torchvision()
    from torchvision import transforms
    x = rand_images(2, 300)
    ref = transforms.Resize((256, 256), interpolation=transforms.InterpolationMode.BILINEAR, antialias=False)(x)
    assert torch.allclose(core.to_eval_size(x), ref, atol=1e-6)


def test_eval_size_leaves_256_images_alone():
    x = rand_images(1, 256)
    assert torch.equal(core.to_eval_size(x), x)


# ------------------------------------------------------------------------------ pixel metrics


def bilinear(x, size):
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def test_pixcorr_matches_np_corrcoef_at_425_after_the_256_pre_resize():
    gts, recons = rand_images(3, 20, seed=1), rand_images(3, 20, seed=2)
    recons = 0.5 * recons + 0.5 * gts  # correlated, so the value is not ~0
    a = bilinear(bilinear(gts, 256), 425).reshape(3, -1).numpy()
    b = bilinear(bilinear(recons, 256), 425).reshape(3, -1).numpy()
    expected = np.mean([np.corrcoef(a[i], b[i])[0, 1] for i in range(3)])
    assert core.pixcorr(recons, gts) == pytest.approx(expected, abs=1e-6)
    assert 0.3 < expected < 0.99


def test_pixcorr_in_blocks_equals_one_block_bit_for_bit():
    n = 2 * core.PIXCORR_CHUNK + 3  # two full blocks and a partial one
    gts, recons = rand_images(n, 20, seed=3), rand_images(n, 20, seed=4)
    r256, g256 = core.to_eval_size(recons), core.to_eval_size(gts)
    whole = core.row_pearson(core.resize(r256, core.PIXEL_SIZE), core.resize(g256, core.PIXEL_SIZE))
    blocks = core.pixcorr_per_image(recons, gts)
    assert blocks.shape == (n,) and np.array_equal(blocks, whole)


def test_pixcorr_of_identical_images_is_one():
    x = rand_images(2)
    assert core.pixcorr(x, x) == pytest.approx(1.0)


def test_ssim_matches_skimage_on_rgb2gray_of_resized_images():
    from skimage.color import rgb2gray
    gts, recons = rand_images(2, 24, seed=3), rand_images(2, 24, seed=4)
    recons = 0.7 * gts + 0.3 * recons
    up = lambda x: bilinear(bilinear(x, 256), 425)  # noqa: E731 - MindEye2: 256 first, then 425
    g = rgb2gray(up(gts).permute(0, 2, 3, 1).numpy())
    r = rgb2gray(up(recons).permute(0, 2, 3, 1).numpy())
    expected = np.mean([structural_similarity(r[i], g[i], gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False, data_range=1.0) for i in range(2)])
    assert core.ssim(recons, gts) == pytest.approx(expected, abs=1e-6)
    assert core.ssim(gts, gts) == pytest.approx(1.0)


def test_public_pixel_metrics_do_the_256_pre_resize_themselves():
    gts, recons = rand_images(2, 300, seed=5), rand_images(2, 300, seed=6)  # 300 px: 256 is a real step
    recons = 0.5 * recons + 0.5 * gts
    g256, r256 = core.to_eval_size(gts), core.to_eval_size(recons)
    assert core.pixcorr(recons, gts) == core.pixcorr(r256, g256)  # bit for bit
    assert core.ssim(recons, gts) == core.ssim(r256, g256)
    # without the pre-resize (300 -> 425 directly) the value differs: the step is not a no-op here
    direct = core.row_pearson(core.resize(recons, core.PIXEL_SIZE), core.resize(gts, core.PIXEL_SIZE)).mean()
    assert abs(core.pixcorr(recons, gts) - direct) > 1e-4


def test_evaluate_reconstructions_uses_the_public_pixel_functions_bit_for_bit():
    from mindhier.evaluate import evaluate_reconstructions
    gts, recons = rand_images(3, 40, seed=7), rand_images(3, 48, seed=8)
    values = evaluate_reconstructions(recons, gts, suite.pixel_metrics())["values"]
    assert values["pixcorr"] == core.pixcorr(recons, gts) and values["ssim"] == core.ssim(recons, gts)
    # and equal to the procedure before the public functions took the pre-resize in
    r, g = core.to_eval_size(recons), core.to_eval_size(gts)
    before = core.row_pearson(core.resize(r, core.PIXEL_SIZE), core.resize(g, core.PIXEL_SIZE))
    assert values["pixcorr"] == float(before.mean())
    grey = lambda x: core.to_grey(core.resize(x, core.PIXEL_SIZE))  # noqa: E731
    before = [structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=1.0) for a, b in zip(grey(r), grey(g))]
    assert values["ssim"] == float(np.array(before).mean())


# ------------------------------------------------------------------------------ two-way identification


def test_correlation_matrix_equals_np_corrcoef_block():
    rng = np.random.default_rng(0)
    real, pred = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    expected = np.corrcoef(real, pred)[:5, 5:]
    assert np.allclose(core.correlation_matrix(real, pred), expected)


def test_two_way_identical_features_is_perfect():
    feats = np.random.default_rng(1).normal(size=(10, 32))
    assert core.two_way_identification(feats, feats) == 1.0


def test_two_way_hand_computed_3x3_case():
    # features chosen so the correlations are easy: real_i are orthogonal-ish patterns
    real = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], float)
    # pred0 is real0 (correct); pred1 is mostly real2, a little real0 (wrong: its own GT is the
    # least correlated); pred2 is real2 plus a little real1 (correct)
    pred = np.array([[1, 0, 0, 0], [0.3, 0, 1, 0], [0, 0.5, 1, 0]], float)
    r = np.corrcoef(real, pred)[:3, 3:]
    # recon 0: own r=1 beats both others -> 2/2; recon 1: own r(real1,pred1) is the lowest -> 0/2
    # recon 2: own r(real2,pred2) beats real0 and real1 -> 2/2
    by_hand = [sum(r[i, j] < r[j, j] for i in range(3) if i != j) / 2 for j in range(3)]
    assert by_hand == [1.0, 0.0, 1.0]
    assert np.allclose(core.two_way_per_image(real, pred), by_hand)
    assert core.two_way_identification(real, pred) == pytest.approx(2 / 3)


def test_two_way_unrelated_features_are_at_chance():
    rng = np.random.default_rng(2)
    scores = [core.two_way_identification(rng.normal(size=(40, 16)), rng.normal(size=(40, 16))) for _ in range(20)]
    assert np.mean(scores) == pytest.approx(0.5, abs=0.03)


def test_two_way_shuffled_predictions_are_at_chance():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(60, 16))
    shuffled = real[rng.permutation(60)] + 0.1 * rng.normal(size=(60, 16))
    assert core.two_way_identification(real, shuffled) == pytest.approx(0.5, abs=0.08)


def test_two_way_counts_exact_ties_as_failures_like_the_original():
    real = np.array([[1.0, 2, 3], [1.0, 2, 3.5], [3.0, 2, 1]])
    pred = real[[0, 0, 2]]  # recons 0 and 1 identical; recon 1 is closer to real0 than to real1
    r = np.corrcoef(real, pred)[:3, 3:]
    original = (r < np.diag(r)).sum(0).mean() / 2  # MindEye2's formula
    assert core.two_way_identification(real, pred) == pytest.approx(original)
    feats = np.ones((3, 4)) + np.eye(3, 4)  # each recon is exactly another GT: its own GT never wins
    assert core.two_way_identification(feats, feats[[1, 2, 0]]) == 0.0


# ------------------------------------------------------------------------------ correlation distance


def test_correlation_distance_matches_scipy():
    rng = np.random.default_rng(4)
    real, pred = rng.normal(size=(6, 50)), rng.normal(size=(6, 50))
    pred[:3] += 2 * real[:3]
    expected = np.mean([scipy.spatial.distance.correlation(real[i], pred[i]) for i in range(6)])
    assert core.correlation_distance(real, pred) == pytest.approx(expected, abs=1e-12)
    assert core.correlation_distance(real, real) == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------ feature metrics


def test_feature_metric_preprocess_resizes_then_normalises():
    metric = suite.FeatureMetric("m", "M", "twoway", extractor=lambda x: x.flatten(1), resize=8,
                                 mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = rand_images(2, 16)
    expected = (F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False) - 0.5) / 0.25
    assert torch.allclose(metric.preprocess(x), expected)
    assert metric.features(x, batch_size=1).shape == (2, 3 * 8 * 8)


def test_layer_features_returns_the_hooked_layer_only():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(inplace=True), torch.nn.Conv2d(4, 2, 3))
    x = rand_images(2, 8)
    got = nets.LayerFeatures(model, "1")(x)
    assert torch.allclose(got, torch.relu(model[0](x)).flatten(1))


def test_alexnet_layers_have_mindeye2_feature_sizes():
    model = nets.build_alexnet()
    x = torch.zeros(1, 3, 256, 256)
    assert nets.LayerFeatures(model, "features.4")(x).shape == (1, 192 * 31 * 31)
    assert nets.LayerFeatures(model, "features.11")(x).shape == (1, 256 * 15 * 15)


# ------------------------------------------------------------------------------ weights


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = nets.build_alexnet()
    path = tmp_path_factory.mktemp("weights") / "alexnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


def test_alexnet_weights_round_trip_through_the_loader(alexnet_file):
    path, original = alexnet_file
    loaded = nets.load_torchvision_net("alexnet", path, allow_unpublished=True)  # random init: unpublished
    for (k, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_pth_weights_are_read_with_weights_only(tmp_path, alexnet_file):
    _, model = alexnet_file
    path = tmp_path / "alexnet-owt-test.pth"
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, path)  # DataParallel prefix
    assert nets.find_weights(tmp_path, "alexnet") == path
    loaded = nets.load_torchvision_net("alexnet", path, allow_unpublished=True)
    assert torch.equal(loaded.features[0].weight, model.features[0].weight)


def test_corrupted_state_dict_names_missing_unexpected_and_misshaped_keys(tmp_path, alexnet_file):
    from safetensors.torch import save_file
    _, model = alexnet_file
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del state["features.0.bias"]
    state["features.99.weight"] = torch.zeros(1)
    state["classifier.6.weight"] = torch.zeros(10, 4096)
    save_file(state, str(tmp_path / "alexnet.safetensors"))
    with pytest.raises(nets.WeightsError) as err:
        nets.load_torchvision_net("alexnet", tmp_path / "alexnet.safetensors", allow_unpublished=True)
    msg = str(err.value)
    assert "features.0.bias" in msg and "features.99.weight" in msg and "classifier.6.weight" in msg


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "alexnet.pth"
    torch.save({"weight": torch.zeros(1), "evil": object()}, path)
    with pytest.raises(nets.WeightsError, match="cannot read"):
        nets.read_state_dict(path)


def test_two_files_for_one_net_is_an_error(tmp_path):
    (tmp_path / "alexnet-a.pth").write_bytes(b"")
    (tmp_path / "alexnet-b.pth").write_bytes(b"")
    with pytest.raises(nets.WeightsError, match="several"):
        nets.find_weights(tmp_path, "alexnet")


def test_swav_ignores_training_heads_but_nothing_else(tmp_path):
    trunk = nets.build_swav_resnet50()
    state = {"module." + k: v for k, v in trunk.state_dict().items()}
    state["module.projection_head.0.weight"] = torch.zeros(2048, 2048)
    state["module.prototypes.weight"] = torch.zeros(3000, 128)
    torch.save(state, tmp_path / "swav_800ep_pretrain.pth.tar")
    path = nets.find_weights(tmp_path, "swav_resnet50")
    loaded = nets.load_torchvision_net("swav_resnet50", path, allow_unpublished=True)
    assert isinstance(loaded.fc, torch.nn.Identity)
    assert nets.LayerFeatures(loaded, "avgpool")(torch.zeros(1, 3, 64, 64)).shape == (1, 2048)


def test_absent_weights_make_metrics_not_available_never_random(tmp_path):
    metrics = {m.key: m for m in suite.standard_metrics(weights_dir=tmp_path)}
    for key in ("alex2", "alex5", "incep", "clip", "eff", "swav"):
        assert not metrics[key].available and metrics[key].reason
        assert not isinstance(metrics[key], suite.FeatureMetric)  # no network was built at all
    assert str(tmp_path) in metrics["alex2"].reason and "alexnet" in metrics["alex2"].reason
    assert metrics["pixcorr"].available and metrics["ssim"].available


def test_standard_suite_uses_a_weight_file_when_present(alexnet_file, tmp_path):
    path, _ = alexnet_file
    (tmp_path / "alexnet.safetensors").symlink_to(path)
    with pytest.raises(nets.UnpublishedWeightsError):  # a random-init file is not torchvision's
        suite.standard_metrics(weights_dir=tmp_path)
    metrics = {m.key: m for m in suite.standard_metrics(weights_dir=tmp_path, allow_unpublished=True)}
    assert metrics["alex2"].available and metrics["alex5"].available
    assert metrics["alex2"].label == "AlexNet(2) (unverified weights)" and not metrics["alex5"].weights["verified"]
    assert (metrics["alex2"].resize, metrics["alex2"].mean) == (256, suite.IMAGENET_MEAN)
    assert not metrics["incep"].available


def test_hf_clip_loader_reads_a_local_folder(tmp_path):
    import_torchvision()
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14, projection_dim=16)
    CLIPVisionModelWithProjection(cfg).save_pretrained(tmp_path)
    with pytest.raises(nets.WeightsError, match="ViT-L/14"):
        nets.load_hf_clip(tmp_path)
    with pytest.raises(nets.WeightsError, match="image_size 28, expected 224"):
        nets.load_hf_clip(tmp_path, require_vit_l14=False)
    embed = nets.load_hf_clip(tmp_path, require_vit_l14=False, image_size=28)
    assert embed(torch.zeros(2, 3, 28, 28)).shape == (2, 16)


# ------------------------------------------------------------------------------ EfficientNet-Lite0


@pytest.fixture(scope="module")
def lite0():
    return nets.load_effnet_lite0()


def _classify(model, image_uint8):
    x = torch.from_numpy(image_uint8).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    mean, std = torch.tensor(nets.LITE0_MEAN).view(1, 3, 1, 1), torch.tensor(nets.LITE0_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((x - mean) / std).softmax(-1)[0]


def test_lite0_weights_are_real_imagenet_weights(lite0):
    # ImageNet classes: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso, 968 cup
    cat = _classify(lite0, skimage.data.chelsea())
    coffee = _classify(lite0, skimage.data.coffee())
    assert int(cat.argmax()) in (281, 282, 285) and float(cat[[281, 282, 285]].sum()) > 0.5
    assert int(coffee.argmax()) in (967, 968) and float(coffee[[967, 968]].sum()) > 0.5


def test_lite0_metrics_share_features_and_behave(lite0):
    metrics = suite.lite0_metrics(lite0)
    assert [m.key for m in metrics] == ["lite0_dist", "lite0_twoway"] and "not comparable" in metrics[0].note
    assert metrics[0].cache_key == metrics[1].cache_key
    images = core.to_eval_size(rand_images(3, 32))
    feats = metrics[0].features(images)
    assert feats.shape == (3, 1280)
    assert metrics[0].score(feats, feats) == pytest.approx(0.0, abs=1e-9)
    assert metrics[1].score(feats, feats) == 1.0


# ------------------------------------------------------------------------------ torchvision shim


def test_torchvision_imports_in_a_fresh_interpreter():
    import subprocess
    code = ("from mindhier.metrics.tv import torchvision_models; m = torchvision_models(); "
            "print(type(m.alexnet(weights=None)).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "AlexNet"


def test_inception_is_configured_like_torchvision_pretrained():
    model = nets.build_inception_v3()
    # torchvision's pretrained Inception expects ImageNet-normalised input and converts it itself
    assert model.transform_input and model.aux_logits
