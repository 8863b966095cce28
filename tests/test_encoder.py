"""The Hierarchical fMRI Encoder: exact paper size, shapes, losses against independent maths,
metrics, checkpoint loading and its errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mindhier.checkpoint import save_checkpoint
from mindhier.config import ConfigError, to_dict
from mindhier.encoder import (
    CLIP_VIT_L14,
    PRESETS,
    EncoderConfig,
    HierarchicalFMRIEncoder,
    MissingTargetsError,
    VisionShape,
    VoxelCountError,
    aligned_mse,
    count_parameters,
    encode_repetitions,
    encoder_loss,
    layer_map,
    load_encoder,
    predicted_embedding,
    soft_clip_loss,
    top1_retrieval,
    two_way_identification,
)
from mindhier.encoder.io import start_from
from mindhier.encoder.losses import LOSS_PRESETS, LossConfig
from mindhier.errors import MindhierError
from mindhier.encoder.targets import check_batch_targets, check_cached_layers

SMALL = VisionShape(num_tokens=5, feature_dim=16, text_tokens=3, text_dim=12)
TINY = PRESETS["tiny"]


def make(cfg=TINY, voxels=40, shape=SMALL, seed=0):
    torch.manual_seed(seed)
    return HierarchicalFMRIEncoder(cfg, voxels, shape)


def test_paper_preset_has_the_official_parameter_count():
    with torch.device("meta"):
        model = HierarchicalFMRIEncoder(PRESETS["paper"], 15724, CLIP_VIT_L14)
    assert count_parameters(model) == 307_292_160
    # The composition the count pins: a 3-layer MLP to 100 tokens, 4 + 4 decoder layers.
    assert len(model.image_layers) == 4 and len(model.text_layers) == 4
    assert model.mlp[-1].out_features == 100 * 768
    assert model.image_layers[0].linear1.out_features == 3072


def test_forward_shapes_and_level_order():
    model = make().eval()
    out = model(torch.randn(3, 40))
    assert len(out.levels) == TINY.num_levels
    assert all(e.shape == (3, 5, 16) for e in out.levels)
    assert out.image_final.shape == (3, 5, 16) and out.text.shape == (3, 3, 12)
    assert predicted_embedding(out).shape == (3, 16)
    torch.testing.assert_close(predicted_embedding(out), model.image_proj(out.levels[-1])[:, 0])


def test_cascade_outputs_are_successive_layers():
    model = make().eval()
    x = torch.randn(2, 40)
    out = model(x)
    memory = model.fmri_tokens(x)
    h = model.image_queries.expand(2, -1, -1)
    for m, layer in enumerate(model.image_layers):
        h = layer(h, memory)
        torch.testing.assert_close(out.levels[m], h)


def test_single_supervision_exposes_only_the_terminal_feature():
    single = dataclasses.replace(TINY, supervision="single")
    model = make(single).eval()
    out = model(torch.randn(2, 40))
    assert len(out.levels) == single.num_levels
    assert all(e is out.levels[-1] for e in out.levels)


def test_outputs_averaging_averages_every_output_of_each_repetition():
    """(B, R, V) voxels: the encoder on each repetition, each output averaged (MindEye2); (B, V):
    one pass (voxels averaged before, MindHier). The two differ: the encoder is not linear."""
    model = make().eval()
    reps = torch.randn(2, 3, 40)
    out = encode_repetitions(model, reps)
    for b in range(2):
        each = [model(reps[b, r][None]) for r in range(3)]
        for m in range(len(out.levels)):
            torch.testing.assert_close(out.levels[m][b], torch.stack([e.levels[m][0] for e in each]).mean(0))
        torch.testing.assert_close(out.image_final[b], torch.stack([e.image_final[0] for e in each]).mean(0))
        torch.testing.assert_close(out.text[b], torch.stack([e.text[0] for e in each]).mean(0))
    assert not torch.allclose(encode_repetitions(model, reps.mean(1)).image_final, out.image_final, atol=1e-4)


def test_wrong_voxel_count_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(batch, 40\)"):
        make()(torch.randn(2, 41))


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match="supervision"):
        EncoderConfig(supervision="partial")
    with pytest.raises(ValueError, match="heads"):
        HierarchicalFMRIEncoder(dataclasses.replace(TINY, heads=3), 10, SMALL)


# ---- losses ------------------------------------------------------------------------------


def numpy_soft_clip(p, t, tau):
    """Independent SoftCLIP: explicit loops over rows, float64."""
    p = p.reshape(len(p), -1).astype(np.float64)
    t = t.reshape(len(t), -1).astype(np.float64)
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True)

    def softmax(row):
        e = np.exp(row - row.max())
        return e / e.sum()

    tt, pt = t @ t.T / tau, p @ t.T / tau
    fwd = bwd = 0.0
    for i in range(len(p)):
        soft = softmax(tt[i])
        fwd -= np.sum(soft * np.log(softmax(pt[i])))
        bwd -= np.sum(soft * np.log(softmax(pt[:, i])))
    return (fwd + bwd) / (2 * len(p))


@pytest.mark.parametrize("tau", [0.005, 0.5])
def test_soft_clip_matches_independent_numpy(tau):
    rng = np.random.default_rng(0)
    t = rng.normal(size=(4, 3, 2))
    p = t + 0.7 * rng.normal(size=t.shape)
    got = soft_clip_loss(torch.tensor(p), torch.tensor(t), tau)
    assert float(got) == pytest.approx(numpy_soft_clip(p, t, tau), rel=1e-5)


def test_soft_clip_is_smallest_at_a_perfect_prediction():
    torch.manual_seed(0)
    t = torch.randn(6, 20)
    perfect = soft_clip_loss(t, t, 0.5)
    for _ in range(5):
        assert perfect < soft_clip_loss(t + 0.5 * torch.randn_like(t), t, 0.5)
    # with distinct targets and a sharp τ the soft targets are one-hot: the minimum is ~0
    assert float(soft_clip_loss(t, t, 0.005)) < 1e-6


def test_aligned_mse_is_eq1_on_normalised_flattened_tensors():
    torch.manual_seed(0)
    a, b = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1))
    torch.testing.assert_close(aligned_mse(a, b), (2 - 2 * cos).mean())
    torch.testing.assert_close(aligned_mse(a, b, "element"), (2 - 2 * cos).mean() / 20)
    assert float(aligned_mse(a, 3 * a)) == pytest.approx(0, abs=1e-6)  # scale-free


def fake_targets(out, layers, final_layer):
    targets = {f"layer_{g}": e.detach().clone() for g, e in zip(layers, out.levels)}
    targets[f"layer_{final_layer}"] = out.image_final.detach().clone()
    targets["text"] = out.text.detach().clone()
    return targets


def test_encoder_loss_parts_by_supervision():
    model = make().eval()
    with torch.no_grad():
        out = model(torch.randn(4, 40))
    layers, final = (2, 4, 6, 7), 8
    targets = {f"layer_{g}": torch.randn(4, 5, 16) for g in (*layers, final)}
    targets["text"] = torch.randn(4, 3, 12)
    total, parts = encoder_loss(out, targets, layers, final, TINY)
    assert set(parts) == {"mse_e1", "mse_e2", "mse_e3", "mse_e4", "mse_final_image", "mse_text",
                          "softclip_image", "softclip_text"}
    assert float(total) == pytest.approx(sum(parts.values()), rel=1e-6)
    final_only = dataclasses.replace(TINY, supervision="final-only")
    _, parts = encoder_loss(out, targets, layers, final, final_only)
    assert [k for k in parts if k.startswith("mse_e")] == ["mse_e4"]


def test_perfect_prediction_gives_the_minimal_loss():
    model = make().eval()
    with torch.no_grad():
        out = model(torch.randn(4, 40))
    layers = (1, 2, 3, 4)
    targets = fake_targets(out, layers, final_layer=9)
    total, parts = encoder_loss(out, targets, layers, 9, TINY)
    for name, value in parts.items():
        if name.startswith("mse"):
            assert value == pytest.approx(0, abs=1e-6), name
    for seed in range(3):
        torch.manual_seed(seed)
        noisy = type(out)(levels=[e + 0.3 * torch.randn_like(e) for e in out.levels],
                          image_final=out.image_final + 0.3 * torch.randn_like(out.image_final),
                          text=out.text + 0.3 * torch.randn_like(out.text))
        assert float(encoder_loss(noisy, targets, layers, 9, TINY)[0]) > float(total)


def test_loss_falls_when_fitting_random_targets():
    torch.manual_seed(1)
    model = make()
    x = torch.randn(8, 40)
    layers = (1, 2, 3, 4)
    targets = {f"layer_{g}": torch.randn(8, 5, 16) for g in (*layers, 6)}
    targets["text"] = torch.randn(8, 3, 12)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, _ = encoder_loss(model(x), targets, layers, 6, TINY)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def random_case(batch=4):
    model = make().eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 40))
    layers, final = (2, 4, 6, 7), 8
    torch.manual_seed(3)
    targets = {f"layer_{g}": torch.randn(batch, 5, 16) for g in (*layers, final)}
    targets["text"] = torch.randn(batch, 3, 12)
    return out, targets, layers, final


def test_text_mse_weight_is_applied_to_the_text_mse_only():
    out, targets, layers, final = random_case()
    total1, parts1 = encoder_loss(out, targets, layers, final, TINY)
    total, parts = encoder_loss(out, targets, layers, final, TINY, LossConfig(text_mse_weight=3.5))
    assert parts == parts1  # logged parts stay unweighted
    assert float(total) == pytest.approx(float(total1) + 2.5 * parts["mse_text"], rel=1e-6)
    total0, _ = encoder_loss(out, targets, layers, final, TINY, LossConfig(text_mse_weight=0.0))
    assert float(total0) == pytest.approx(float(total1) - parts["mse_text"], rel=1e-6)


def test_official_weighting_matches_the_official_200000_mean_mse():
    """The official code: every MSE is 200000 · nn.MSELoss on flattened normalised tensors.
    With text_mse_weight = (T·D)/(Tt·Dt) our text MSE stands to our image MSE as there."""
    out, targets, layers, final = random_case()
    weight = (5 * 16) / (3 * 12)  # SMALL's (T·D)/(Tt·Dt); 257/77 for CLIP ViT-L/14
    _, parts = encoder_loss(out, targets, layers, final, TINY, LossConfig(text_mse_weight=weight))
    def mse(a, b):  # the official term, on flattened normalised tensors
        norm = lambda x: torch.nn.functional.normalize(x.float().flatten(1), dim=-1)
        return 200000 * torch.nn.functional.mse_loss(norm(a), norm(b))

    official = float(mse(out.text, targets["text"]) / mse(out.image_final, targets[f"layer_{final}"]))
    assert weight * parts["mse_text"] / parts["mse_final_image"] == pytest.approx(official, rel=1e-5)


def test_loss_presets():
    assert set(LOSS_PRESETS) == set(PRESETS)
    assert LOSS_PRESETS["paper"].text_mse_weight == pytest.approx((257 * 768) / (77 * 768))
    assert LOSS_PRESETS["paper"].text_mse_weight == pytest.approx(
        (200000 / (77 * 768)) / (200000 / (257 * 768)))  # ≈ 3.34: the official text/image ratio
    assert LOSS_PRESETS["demo"].text_mse_weight == LOSS_PRESETS["tiny"].text_mse_weight == 1.0
    assert encoder_loss.__defaults__[-1] is None  # no LossConfig: the paper's unit weights
    with pytest.raises(ConfigError, match="text_mse_weight must be a number >= 0"):
        LossConfig(text_mse_weight=-1.0)


# ---- layer maps and targets --------------------------------------------------------------


def test_layer_maps_are_the_papers_on_24_layers():
    assert layer_map("balanced", 24) == (12, 16, 20, 24)
    assert layer_map("early", 24) == (6, 12, 18, 24)
    assert layer_map("late", 24) == (18, 20, 22, 24)
    assert layer_map("default", 24) == (12, 16, 20, 24)
    assert layer_map("default", 12, default=(3, 6, 9, 12)) == (3, 6, 9, 12)
    assert layer_map("early", 12) == (3, 6, 9, 12)
    with pytest.raises(Exception, match="unknown layer map"):
        layer_map("middle", 24)


def test_missing_targets_are_named():
    with pytest.raises(MissingTargetsError, match=r"missing \[4, 8\]"):
        check_cached_layers((2, 6), (2, 4, 6, 8), 8, "cache.h5")
    with pytest.raises(MissingTargetsError, match="text"):
        check_batch_targets({"layer_1": 0, "layer_2": 0}, (1, 2), 2, "cache.h5")


# ---- metrics -----------------------------------------------------------------------------


def test_identification_and_retrieval_against_brute_force():
    torch.manual_seed(0)
    t = torch.randn(7, 6)
    p = t + 1.2 * torch.randn(7, 6)
    sim = np.array([[np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for b in t.numpy()] for a in p.numpy()])
    two_way = np.mean([np.mean([sim[i, i] > sim[i, j] for j in range(7) if j != i]) for i in range(7)])
    assert two_way_identification(p, t) == pytest.approx(two_way)
    assert top1_retrieval(p, t) == pytest.approx(np.mean(sim.argmax(1) == np.arange(7)))
    assert two_way_identification(t, t) == 1.0 and top1_retrieval(t, t) == 1.0


# ---- checkpoints -------------------------------------------------------------------------


def save_encoder(model, path, subject=1):
    meta = {"num_voxels": model.num_voxels, "subject": subject,
            "vision": {"shape": dataclasses.asdict(model.vision)}}
    tensors = dict(model.state_dict())
    tensors["optim.0.exp_avg"] = torch.zeros(3)  # training state rides along; loading skips it
    save_checkpoint(path, tensors, kind="encoder", config=model.cfg, extra=meta)


def test_load_encoder_round_trip(tmp_path):
    model = make().eval()
    save_encoder(model, tmp_path / "enc")
    loaded, meta = load_encoder(tmp_path / "enc.safetensors", num_voxels=40, subject=1)
    assert meta["config"] == to_dict(TINY) and not loaded.training
    x = torch.randn(2, 40)
    torch.testing.assert_close(loaded(x).image_final, model(x).image_final)


def test_load_encoder_refuses_another_subjects_voxels(tmp_path):
    save_encoder(make(), tmp_path / "enc", subject=1)
    with pytest.raises(VoxelCountError, match=r"40 voxels \(subject 1\).*subject 2 has 55 voxels"):
        load_encoder(tmp_path / "enc", num_voxels=55, subject=2)


def test_load_encoder_refuses_damaged_or_foreign_checkpoints(tmp_path):
    save_checkpoint(tmp_path / "vq", {"w": torch.zeros(1)}, kind="tokenizer", config={"a": 1})
    with pytest.raises(Exception, match="'tokenizer' checkpoint"):
        load_encoder(tmp_path / "vq")
    model = make()
    meta = {"num_voxels": 40, "vision": {"shape": dataclasses.asdict(SMALL)}}
    bigger = dataclasses.replace(TINY, fmri_tokens=9)
    save_checkpoint(tmp_path / "enc", dict(model.state_dict()), kind="encoder", config=bigger, extra=meta)
    with pytest.raises(Exception, match="fmri_pos"):
        load_encoder(tmp_path / "enc")
    bad_cfg = {**to_dict(TINY), "depth": 3}
    save_checkpoint(tmp_path / "enc2", dict(model.state_dict()), kind="encoder", config=bad_cfg, extra=meta)
    with pytest.raises(ConfigError, match="unknown config keys"):
        load_encoder(tmp_path / "enc2")


def test_start_from_another_subject_reuses_every_weight_but_the_voxel_input_layer(tmp_path):
    donor = make(voxels=40, seed=0)
    save_encoder(donor, tmp_path / "s1", subject=1)
    vision = {"shape": dataclasses.asdict(SMALL)}
    new = make(voxels=55, seed=1)
    fresh = {k: v.clone() for k, v in new.state_dict().items()}
    record = start_from(tmp_path / "s1", new, subject=2, vision=vision)
    assert record["reinitialised"] == ["mlp.0.weight", "mlp.0.bias"] and record["subject"] == 1
    assert record["path"] == str(tmp_path / "s1") and record["identity"]["kind"] == "encoder"
    for key, value in new.state_dict().items():
        assert torch.equal(value, fresh[key] if key.startswith("mlp.0.") else donor.state_dict()[key]), key
    same = make(voxels=40, seed=2)                      # the same subject continues with every weight
    assert start_from(tmp_path / "s1", same, subject=1, vision=vision)["reinitialised"] == []
    assert all(torch.equal(v, donor.state_dict()[k]) for k, v in same.state_dict().items())


def test_start_from_refuses_another_shape_or_vision_model(tmp_path):
    save_encoder(make(), tmp_path / "s1")
    vision = {"shape": dataclasses.asdict(SMALL)}
    other_shape = make(cfg=dataclasses.replace(TINY, fmri_tokens=9), voxels=55)
    with pytest.raises(MindhierError, match=r"does not fit this run:\n  fmri_tokens: expected 9, checkpoint has 8"):
        start_from(tmp_path / "s1", other_shape, subject=2, vision=vision)
    with pytest.raises(MindhierError, match=r"vision layers: this run \[2, 4\], the checkpoint None"):
        start_from(tmp_path / "s1", make(voxels=55), subject=2, vision={**vision, "layers": [2, 4]})
