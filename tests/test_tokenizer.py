"""Multi-scale residual VQ-VAE: quantiser semantics, VAR key parity, reference conformance, errors."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mindhier.checkpoint import CheckpointError, save_checkpoint
from mindhier.config import ConfigError
from mindhier.tokenizer import (
    PRESETS,
    MultiScaleVQVAE,
    TokenizerInputError,
    VQVAEConfig,
    load_tokenizer,
    load_vqvae_state_dict,
)

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def needs_reference(name: str) -> Path:
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"upstream reference tensors not found at {path} (../shared beside the checkout)")
    return path


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return MultiScaleVQVAE(PRESETS["tiny"]).eval()


def random_indices(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.vocab_size, (batch, pn * pn), generator=g) for pn in model.scales]


def test_shapes_and_properties(tiny):
    cfg = PRESETS["tiny"]
    assert tiny.scales == (1, 2, 3, 4) and tiny.num_tokens == 1 + 4 + 9 + 16
    img = torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1
    idx = tiny.img_to_indices(img)
    assert [tuple(i.shape) for i in idx] == [(2, pn * pn) for pn in tiny.scales]
    assert all(i.dtype == torch.long for i in idx)
    out = tiny.indices_to_img(idx)
    assert out.shape == img.shape and out.min() >= -1 and out.max() <= 1
    assert tiny.teacher_forcing_input(idx).shape == (2, tiny.num_tokens - 1, cfg.z_channels)
    recon, vq_loss, stats = tiny.train()(img)
    tiny.eval()
    assert recon.shape == img.shape and vq_loss.ndim == 0 and stats["hits"].shape == (4, cfg.vocab_size)
    assert stats["hits"].sum(1).tolist() == [2 * pn * pn for pn in tiny.scales]


def test_value_range_helpers():
    x = torch.rand(1, 3, 4, 4)
    assert torch.allclose(MultiScaleVQVAE.output_to_images01(MultiScaleVQVAE.images01_to_input(x)), x)
    assert MultiScaleVQVAE.images01_to_input(torch.zeros(1)).item() == -1.0


def test_phi_mapping_for_the_ten_scale_schedule():
    with torch.device("meta"):
        model = MultiScaleVQVAE(PRESETS["paper"])
    assert [model.phi_index(k) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [MultiScaleVQVAE(PRESETS["tiny"]).phi_index(k) for k in range(4)] == [0, 1, 2, 3]


def test_fhat_is_the_sum_of_phi_of_upsampled_codes(tiny):
    """Independent computation of f̂: Σ_k φ_k(bicubic(Z[r_k])) with the last scale untouched."""
    idx = random_indices(tiny)
    n, phis = tiny.scales[-1], tiny.quantize.quant_resi.qresi_ls
    expected = 0
    with torch.no_grad():
        for k, (pn, r) in enumerate(zip(tiny.scales, idx)):
            h = tiny.quantize.embedding.weight[r].reshape(2, pn, pn, -1).permute(0, 3, 1, 2)
            if pn != n:
                h = F.interpolate(h, size=(n, n), mode="bicubic")
            conv = phis[tiny.phi_index(k)]
            expected = expected + 0.5 * h + 0.5 * F.conv2d(h, conv.weight, conv.bias, padding=1)
        assert torch.allclose(tiny.indices_to_fhat(idx), expected, atol=1e-5)
        fhats = tiny.cumulative_fhats(idx)
        assert len(fhats) == 4 and torch.allclose(fhats[-1], expected, atol=1e-5)
        assert len(tiny.cumulative_images(idx[:2])) == 2  # a prefix decodes coarse pictures


def test_requantising_fhat_returns_its_own_indices():
    """Constructed round trip: identity φ (ratio 0), a coarse codebook half (norm ~10) for
    scale 1 and a fine half (norm ~0.1) for the last scale. Then f̂(r) re-quantises to r:
    indices -> f̂ -> indices is the identity."""
    cfg = VQVAEConfig(vocab_size=16, z_channels=4, ch=8, ch_mult=(1, 2), num_res_blocks=1, image_size=4,
                      scales=(1, 2), quant_resi=0.0, norm_groups=4)
    torch.manual_seed(1)
    model = MultiScaleVQVAE(cfg).eval()
    coarse = F.normalize(torch.randn(8, 4), dim=1) * 10
    fine = F.normalize(torch.randn(8, 4), dim=1) * 0.1
    with torch.no_grad():
        model.quantize.embedding.weight.copy_(torch.cat([coarse, fine]))
        idx = [torch.tensor([[3], [5]]), torch.tensor([[9, 10, 11, 12], [8, 13, 14, 15]])]
        fhat = model.indices_to_fhat(idx)
        # φ is the identity here, so f̂ is the broadcast coarse code plus the fine codes.
        want = coarse[idx[0][:, 0]][:, :, None, None] + fine[idx[1] - 8].transpose(1, 2).reshape(2, 4, 2, 2)
        assert torch.allclose(fhat, want, atol=1e-5)
        again, fhats = model.quantize.encode(fhat)
    assert all(torch.equal(a, b) for a, b in zip(again, idx))
    assert torch.allclose(fhats[-1], fhat, atol=1e-5)


def test_teacher_forcing_equals_step_by_step_sampling(tiny):
    idx = random_indices(tiny, seed=3)
    with torch.no_grad():
        tf = tiny.teacher_forcing_input(idx)
        fhat, inputs = None, []
        for k in range(len(tiny.scales)):
            fhat, nxt = tiny.next_scale_input(k, fhat, tiny.embed_indices(k, idx[k]))
            if nxt is not None:
                inputs.append(nxt)
        assert nxt is None
        assert torch.equal(torch.cat(inputs, 1), tf)
        assert torch.allclose(fhat, tiny.indices_to_fhat(idx))
        # The input of scale 2 is the area-downsample of f̂ after scale 1.
        f1 = tiny.cumulative_fhats(idx[:1])[0]
        want = F.adaptive_avg_pool2d(f1, 2).flatten(2).transpose(1, 2)
        assert torch.allclose(tf[:, :4], want, atol=1e-6)


def test_paper_preset_matches_var_keys_and_param_count():
    ref = json.loads(needs_reference("vqvae_paper_keys.json").read_text())
    with torch.device("meta"):
        model = MultiScaleVQVAE(PRESETS["paper"])
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(shapes) == sorted(ref["state_dict"]) and len(shapes) == 324
    assert shapes == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["n_params"] == 108_948_355
    assert ref["config"]["v_patch_nums"] == list(PRESETS["paper"].scales)


def test_conformance_with_reference_small_model():
    from safetensors.torch import load_file

    weights = needs_reference("vqvae_small_weights.safetensors")
    io = load_file(str(needs_reference("vqvae_small_io.safetensors")))
    cfg_ref = json.loads(needs_reference("vqvae_small_config.json").read_text())
    cfg = PRESETS["reference-small"]
    assert (cfg.vocab_size, cfg.z_channels, cfg.ch, list(cfg.scales), cfg.image_size) == (
        cfg_ref["vocab_size"], cfg_ref["z_channels"], cfg_ref["ch"], cfg_ref["v_patch_nums"], cfg_ref["image_size"])
    model = load_vqvae_state_dict(MultiScaleVQVAE(cfg), weights).eval()
    with torch.no_grad():
        f = model.encode(io["input_image"])
        assert torch.allclose(f, io["encoder_f"], atol=1e-5)
        idx = model.img_to_indices(io["input_image"])
        for k in range(len(cfg.scales)):
            assert torch.equal(idx[k], io[f"indices_scale{k}"]), f"indices of scale {k}"
        for k, fh in enumerate(model.cumulative_fhats(idx)):
            assert torch.allclose(fh, io[f"fhat_after_scale{k}"], atol=1e-5)
        assert torch.allclose(model.teacher_forcing_input(idx), io["teacher_forcing_input"], atol=1e-5)
        fhat, inputs = None, []
        for k in range(len(cfg.scales)):
            fhat, nxt = model.next_scale_input(k, fhat, model.embed_indices(k, io[f"indices_scale{k}"]))
            inputs += [nxt] if nxt is not None else []
        assert torch.allclose(torch.cat(inputs, 1), io["sampling_next_inputs"], atol=1e-5)
        assert torch.allclose(fhat, io["final_fhat_from_sampling"], atol=1e-5)
        assert torch.allclose(model.indices_to_img(idx), io["decoded_image"], atol=1e-4)


def test_wrong_image_size_is_a_clear_error(tiny):
    with pytest.raises(TokenizerInputError, match=r"expected|resize the images to cfg.image_size=32"):
        tiny.img_to_indices(torch.zeros(1, 3, 64, 64))
    with pytest.raises(TokenizerInputError, match=r"got \(1, 1, 32, 32\)"):
        tiny.img_to_indices(torch.zeros(1, 1, 32, 32))
    with pytest.raises(TokenizerInputError, match="scale 1"):
        tiny.indices_to_img([torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long),
                             torch.zeros(1, 9, dtype=torch.long), torch.zeros(1, 16, dtype=torch.long)])


def test_checkpoint_round_trip_and_other_config_is_refused(tmp_path, tiny):
    path = save_checkpoint(tmp_path / "tok", tiny.state_dict(), kind="tokenizer", config=tiny.cfg)
    back = load_tokenizer(path)
    assert back.cfg == tiny.cfg
    for k, v in tiny.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    other = VQVAEConfig(**{**tiny.cfg.__dict__, "vocab_size": 128})
    with pytest.raises(ConfigError, match="vocab_size"):
        load_tokenizer(path, config=other)
    with pytest.raises(CheckpointError, match=r"shape mismatch: .*quantize.embedding.weight \(64, 8\) vs model \(128, 8\)"):
        load_vqvae_state_dict(MultiScaleVQVAE(other), path)


def test_config_validation():
    with pytest.raises(ConfigError, match="last scale"):
        VQVAEConfig(image_size=64, ch_mult=(1, 2), scales=(1, 2, 4))


def test_real_weights_from_pth_and_safetensors(tmp_path, tiny):
    """A user's VAR/Switti state dict: .pth through torch.load(weights_only=True), or .safetensors."""
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    torch.save(state, tmp_path / "vae.pth")
    save_file(state, str(tmp_path / "vae.safetensors"))
    for name in ("vae.pth", "vae.safetensors"):
        model = load_vqvae_state_dict(MultiScaleVQVAE(tiny.cfg), tmp_path / name)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    torch.save({"weights": state, "note": object.__new__(VQVAEConfig)}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="plain state dict"):
        load_vqvae_state_dict(MultiScaleVQVAE(tiny.cfg), tmp_path / "pickled.pth")
    state.pop("quantize.embedding.weight")
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys: quantize.embedding.weight"):
        load_vqvae_state_dict(MultiScaleVQVAE(tiny.cfg), tmp_path / "partial.safetensors")


def test_import_tokenizer_writes_a_checkpoint_that_loads(tmp_path):
    from safetensors.torch import save_file

    from mindhier import cli
    from mindhier.tokenizer import PRESETS, MultiScaleVQVAE, load_tokenizer

    torch.manual_seed(0)
    source = MultiScaleVQVAE(PRESETS["tiny"])
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "vae.safetensors"))
    argv = ["import-tokenizer", "--weights", str(tmp_path / "vae.safetensors"), "--preset", "tiny",
            "--out", str(tmp_path / "tok")]
    assert cli.main(argv) == 0
    loaded = load_tokenizer(tmp_path / "tok" / "tokenizer")
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert cli.main(argv) == 2  # refuses to overwrite
    assert cli.main(argv[:4] + ["demo", "--out", str(tmp_path / "tok2")]) == 2  # wrong architecture: named keys
