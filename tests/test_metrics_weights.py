"""Which weight files the evaluation networks accept (SPEC §6): torchvision's published files by
their sha256 prefix, everything else only with allow_unpublished and then labelled as such; and
the CLIP config check. Weight files here are tiny state dicts written with torch.save and read
with weights_only=True; the table of published files is monkeypatched to their hashes."""

import hashlib

import pytest
import torch
from torch import nn

from mindhier.errors import MindhierError
from mindhier.evaluate import evaluate_reconstructions
from mindhier.metrics import nets, suite
from mindhier.metrics.tv import import_torchvision, torchvision_models

V1 = "EfficientNet_B1_Weights.IMAGENET1K_V1"
V2 = "EfficientNet_B1_Weights.IMAGENET1K_V2"


class TinyNet(nn.Module):
    """Stands in for a torchvision net: has the `avgpool` node the suite hooks."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.avgpool(self.conv(x))


def save_tiny(folder, stem, seed=0, named_by_hash=True):
    """A TinyNet state dict saved as `<stem>-<its sha256[:8]>.pth` (torchvision's naming) or `<stem>.pth`."""
    torch.manual_seed(seed)
    tmp = folder / f"{stem}.pth"
    torch.save(TinyNet().state_dict(), tmp)
    if not named_by_hash:
        return tmp
    path = folder / f"{stem}-{nets.file_sha256(tmp)[:8]}.pth"
    tmp.rename(path)  # renaming does not change the bytes, so the hash in the name stays true
    return path


def publish(monkeypatch, net, *files):
    """Make ``files`` [(path, variant)] the published files of ``net``."""
    monkeypatch.setitem(nets.PUBLISHED, net, tuple(nets.PublishedFile(p.name, v) for p, v in files))


@pytest.fixture
def tiny_builders(monkeypatch):
    for net in nets.BUILDERS:
        monkeypatch.setitem(nets.BUILDERS, net, TinyNet)


def rand_images(n, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ the table


def test_published_table_is_torchvisions_own():
    import_torchvision()
    tvm = torchvision_models()
    enums = {"alexnet": [tvm.AlexNet_Weights.IMAGENET1K_V1],
             "inception_v3": [tvm.Inception_V3_Weights.IMAGENET1K_V1],
             "efficientnet_b1": [tvm.EfficientNet_B1_Weights.IMAGENET1K_V1, tvm.EfficientNet_B1_Weights.IMAGENET1K_V2]}
    for net, members in enums.items():
        expected = [(m.url, f"{type(m).__name__}.{m.name}") for m in members]
        assert [(f.url, f.variant) for f in nets.PUBLISHED[net]] == expected, net
        for f in nets.PUBLISHED[net]:  # the prefix torch.hub checks a download against
            assert torch.hub.HASH_REGEX.search(f.name).group(1) == f.prefix and len(f.prefix) == 8
    # MindEye2 used DEFAULT, which is V2; the suite's marker for "MindEye2's file" must say so
    assert tvm.EfficientNet_B1_Weights.DEFAULT == tvm.EfficientNet_B1_Weights.IMAGENET1K_V2
    assert suite.EFF_MINDEYE2_VARIANT == V2
    assert nets.PUBLISHED["swav_resnet50"] == ()


def test_file_sha256_is_hashlibs_whatever_the_chunk(tmp_path):
    path = tmp_path / "blob.pth"
    path.write_bytes(bytes(range(256)) * 13)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert nets.file_sha256(path) == nets.file_sha256(path, chunk=7) == expected


# ------------------------------------------------------------------------------ accepted files


def test_published_file_is_accepted_and_identified(tmp_path, monkeypatch, tiny_builders):
    v1 = save_tiny(tmp_path, "efficientnet_b1_rwightman", seed=1)
    v2 = save_tiny(tmp_path, "efficientnet_b1", seed=2)
    publish(monkeypatch, "efficientnet_b1", (v1, V1), (v2, V2))
    for path, variant in ((v1, V1), (v2, V2)):
        model = nets.load_torchvision_net("efficientnet_b1", path)
        who = nets.weights_identity(model)
        assert who.verified and who.published == path.name and who.variant == variant
        assert who.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert who.as_dict()["verified"] and variant in who.describe()


def test_suite_shows_the_efficientnet_variant_in_results(tmp_path, monkeypatch, tiny_builders):
    v1 = save_tiny(tmp_path, "efficientnet_b1_rwightman", seed=1)
    v2 = save_tiny(tmp_path, "efficientnet_b1", seed=2)
    publish(monkeypatch, "efficientnet_b1", (v1, V1), (v2, V2))
    gts, recons = rand_images(2, seed=1), rand_images(2, seed=2)
    columns = {}
    for path in (v1, v2):
        folder = tmp_path / path.stem
        folder.mkdir()
        path.rename(folder / path.name)
        eff = {m.key: m for m in suite.standard_metrics(weights_dir=folder)}["eff"]
        assert eff.weights["published"] == path.name
        columns[path] = evaluate_reconstructions(recons, gts, [eff])["columns"][0]
    # V2 (DEFAULT) is MindEye2's: plain label; V1 is flagged in the label and the note
    assert columns[v2]["label"] == "EffNet-B1" and v2.name in columns[v2]["note"] and "IMAGENET1K_V2" in columns[v2]["note"]
    assert columns[v1]["label"] == "EffNet-B1 (IMAGENET1K_V1)"
    assert v1.name in columns[v1]["note"] and "not comparable" in columns[v1]["note"]


# ------------------------------------------------------------------------------ refused files


def test_unpublished_file_is_refused_naming_file_expected_and_fix(tmp_path, tiny_builders):
    path = save_tiny(tmp_path, "efficientnet_b1", named_by_hash=False)  # real table: matches nothing
    with pytest.raises(nets.UnpublishedWeightsError) as err:
        nets.load_torchvision_net("efficientnet_b1", path)
    msg = str(err.value)
    assert isinstance(err.value, MindhierError) and str(path) in msg
    assert "efficientnet_b1-c27df63c.pth" in msg and "efficientnet_b1_rwightman-bac287d4.pth" in msg
    assert "download" in msg and "allow_unpublished=True" in msg and "unverified weights" in msg
    with pytest.raises(nets.UnpublishedWeightsError):  # the suite does not swallow it either
        suite.standard_metrics(weights_dir=tmp_path)


def test_a_name_with_its_own_hash_is_not_enough(tmp_path, tiny_builders):
    path = save_tiny(tmp_path, "alexnet-owt")  # true hash in the name, but not torchvision's file
    with pytest.raises(nets.UnpublishedWeightsError, match="alexnet-owt-7be5be79.pth"):
        nets.load_torchvision_net("alexnet", path)


def test_content_that_does_not_match_the_hash_in_its_name_is_refused(tmp_path, tiny_builders):
    path = tmp_path / "alexnet-owt-7be5be79.pth"  # torchvision's name, other bytes (e.g. a broken download)
    torch.save(TinyNet().state_dict(), path)
    for allow in (False, True):  # the opt-out does not cover a file that lies about what it is
        with pytest.raises(nets.WeightsError, match="claims sha256 7be5be79") as err:
            nets.load_torchvision_net("alexnet", path, allow_unpublished=allow)
        assert str(path) in str(err.value) and "download.pytorch.org/models/alexnet-owt-7be5be79.pth" in str(err.value)


def test_another_networks_published_file_is_named(tmp_path, monkeypatch):
    path = save_tiny(tmp_path, "alexnet-owt")
    publish(monkeypatch, "alexnet", (path, "AlexNet_Weights.IMAGENET1K_V1"))
    with pytest.raises(nets.WeightsError, match=f"{path.name} \\(alexnet\\), not efficientnet_b1"):
        nets.verify_weights("efficientnet_b1", path, allow_unpublished=True)


def test_swav_has_no_published_digest_so_needs_the_opt_out(tmp_path, tiny_builders):
    path = tmp_path / "swav_800ep_pretrain.pth.tar"
    torch.save(TinyNet().state_dict(), path)
    with pytest.raises(nets.UnpublishedWeightsError, match="no published digest") as err:
        nets.load_torchvision_net("swav_resnet50", path)
    assert nets.SWAV_URL in str(err.value)
    assert not nets.weights_identity(nets.load_torchvision_net("swav_resnet50", path, allow_unpublished=True)).verified


# ------------------------------------------------------------------------------ the opt-out


def test_opt_out_is_recorded_as_unverified_weights(tmp_path, tiny_builders):
    path = save_tiny(tmp_path, "efficientnet_b1", named_by_hash=False)
    who = nets.weights_identity(nets.load_torchvision_net("efficientnet_b1", path, allow_unpublished=True))
    assert not who.verified and who.published is None and "UNVERIFIED WEIGHTS" in who.describe()
    eff = {m.key: m for m in suite.standard_metrics(weights_dir=tmp_path, allow_unpublished=True)}["eff"]
    assert eff.weights["verified"] is False and eff.weights["sha256"] == who.sha256
    column = evaluate_reconstructions(rand_images(2, seed=1), rand_images(2, seed=2), [eff])["columns"][0]
    assert column["label"] == "EffNet-B1 (unverified weights)" and "UNVERIFIED WEIGHTS efficientnet_b1.pth" in column["note"]


def test_default_metrics_passes_the_opt_out_on(tmp_path, tiny_builders):
    save_tiny(tmp_path, "efficientnet_b1", named_by_hash=False)
    with pytest.raises(nets.UnpublishedWeightsError):
        suite.default_metrics(tmp_path)
    metrics = {m.key: m for m in suite.default_metrics(tmp_path, allow_unpublished=True)}
    assert metrics["eff"].available and "unverified" in metrics["eff"].label


# ------------------------------------------------------------------------------ CLIP


def vit_l14_config(image_size):
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(image_size=image_size, patch_size=14, hidden_size=1024, num_hidden_layers=24,
                            num_attention_heads=16, intermediate_size=4096, projection_dim=768)


def test_clip_at_336_px_is_refused_before_any_weight_is_read(tmp_path):
    import_torchvision()
    from transformers import CLIPConfig
    vit_l14_config(336).save_pretrained(tmp_path / "vision")  # ViT-L/14-336: same widths, other size
    full = vit_l14_config(336).to_dict()
    CLIPConfig(vision_config=full).save_pretrained(tmp_path / "full")  # openai's layout: a whole CLIPModel
    for folder in ("vision", "full"):
        with pytest.raises(nets.WeightsError, match="image_size 336, expected 224") as err:
            nets.load_hf_clip(tmp_path / folder)
        assert str(tmp_path / folder) in str(err.value) and "clip-vit-large-patch14" in str(err.value)


def test_clip_vit_l14_at_224_px_passes_the_config_check(tmp_path):
    # the check alone: loading a ViT-L/14 (300M parameters) is too slow for a unit test
    assert nets.check_clip_config(vit_l14_config(224), tmp_path, require_vit_l14=True, image_size=224) is None
    with pytest.raises(nets.WeightsError, match="image_size 224, expected 336"):
        nets.check_clip_config(vit_l14_config(224), tmp_path, require_vit_l14=True, image_size=336)
    assert nets.CLIP_IMAGE_SIZE == 224 and suite.clip_metric(None).reason  # no folder: n/a, not an error


def test_clip_folder_without_config_is_refused(tmp_path):
    # transformers would build a default config from an empty folder, silently
    with pytest.raises(nets.WeightsError, match="no config.json"):
        nets.load_hf_clip(tmp_path)
