"""Stage-2 generator: Switti conformance, routing (paper §3.3), the two forward paths agreeing,
and starting from Switti-512 weights."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mindhier.config import ConfigError, from_dict, to_dict
from mindhier.generator import (
    PRESETS,
    Condition,
    GeneratorConfig,
    GeneratorInputError,
    ScaleAwareGenerator,
    SwittiWeightsError,
    load_switti_weights,
    routing_table,
    switti_key_to_ours,
)

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def needs_reference(name):
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"upstream reference file {path} is absent (it lives in ../shared/reference)")
    return path


def tiny_model(routing="scale-aware", seed=0, **changes):
    """A tiny generator with weights far from the (near-identity) initialisation, so every branch
    of every block — including the AdaLN gates — contributes to the logits."""
    cfg = dataclasses.replace(PRESETS["tiny"], routing=routing, **changes)
    torch.manual_seed(seed)
    model = ScaleAwareGenerator(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def random_inputs(cfg, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    levels = [torch.randn(batch, cfg.tokens_per_level, cfg.context_dim, generator=g)
              for _ in range(cfg.num_levels)]
    tf_input = torch.randn(batch, cfg.seq_len - cfg.first_len, cfg.z_channels, generator=g)
    return levels, tf_input


def scale_slices(cfg):
    out, start = [], 0
    for pn in cfg.scales:
        out.append(slice(start, start + pn * pn))
        start += pn * pn
    return out


# ---------------------------------------------------------------------------------------------
# Conformance with upstream Switti
# ---------------------------------------------------------------------------------------------

def test_reference_small_config_matches_upstream_json():
    ref = json.loads(needs_reference("switti_small_config.json").read_text())
    cfg = PRESETS["reference-small"]
    assert (cfg.depth, cfg.width, cfg.num_heads) == (ref["depth"], ref["embed_dim"], ref["num_heads"])
    assert list(cfg.scales) == ref["patch_nums"]
    assert (cfg.z_channels, cfg.vocab_size) == (ref["Cvae"], ref["V"])
    assert (cfg.context_dim, cfg.pooled_dim) == (ref["context_dim"], ref["pooled_dim"])
    assert (cfg.rope_theta, cfg.rope_size, cfg.norm_eps) == (ref["rope_theta"], ref["rope_size"], ref["norm_eps"])
    assert cfg.routing == "none"


def test_reproduces_switti_small_hidden_states_and_logits():
    from safetensors.torch import load_file

    weights = load_file(needs_reference("switti_small_weights.safetensors"))
    io = load_file(needs_reference("switti_small_io.safetensors"))
    model = ScaleAwareGenerator(PRESETS["reference-small"]).eval()
    report = load_switti_weights(model, weights)
    assert sorted(report.loaded) == sorted(n for n, _ in model.named_parameters())
    assert not report.reinitialised
    assert sorted(report.not_used) == ["attn_bias_for_masking", "lvl_1L"]

    with torch.no_grad():
        logits, hidden = model(io["teacher_forcing_input"], cond=Condition(io["context"], io["pooled"]),
                               return_hidden=True)
    for i in range(3):
        err = (hidden[i] - io[f"hidden_{i}"]).abs().max().item()
        assert err < 1e-4, f"hidden_{i} differs by {err}"
    assert (logits - io["logits"]).abs().max().item() < 1e-4

    freqs = torch.view_as_real(model.rope_table("cpu"))[None]
    assert freqs.shape == io["freqs_cis_real"].shape
    assert (freqs - io["freqs_cis_real"]).abs().max().item() < 1e-5
    # The derived buffers we rebuild from the schedule equal upstream's stored ones.
    assert torch.equal(model.scale_of_token, weights["lvl_1L"][0])
    assert torch.equal(model.self_mask, weights["attn_bias_for_masking"][0, 0] == 0)


# ---------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------

def test_routing_table_known_answers():
    paper = PRESETS["paper"]
    assert routing_table(paper) == (4, 4, 4, 3, 3, 2, 2, 2, 1, 1)          # SPEC §5
    assert routing_table(dataclasses.replace(paper, routing="inverted")) == (1, 1, 1, 2, 2, 3, 3, 3, 4, 4)
    assert routing_table(dataclasses.replace(paper, routing="single")) == (4,) * 10
    assert routing_table(dataclasses.replace(paper, routing="none")) == (None,) * 10
    # From the config's own schedule: K = 6, M = 4 by the formula h_k = M − ⌊M(k−1)/K⌋, k 1-based.
    tiny = PRESETS["tiny"]
    assert routing_table(tiny) == tuple(4 - (4 * (k - 1)) // 6 for k in range(1, 7)) == (4, 4, 3, 2, 2, 1)
    assert ScaleAwareGenerator(tiny).routing_table() == (4, 4, 3, 2, 2, 1)


def test_routing_needs_no_more_levels_than_scales():
    with pytest.raises(ConfigError, match="M ≤ K"):
        dataclasses.replace(PRESETS["tiny"], num_levels=7)


def test_condition_orders_context_coarse_first_and_pools_the_seed_level():
    model = tiny_model()
    cfg = model.cfg
    levels, _ = random_inputs(cfg)
    cond = model.condition(levels)
    T = cfg.tokens_per_level
    for s in range(cfg.num_levels):                    # segment s holds e_{M−s}
        assert torch.equal(cond.context[:, s * T:(s + 1) * T], levels[cfg.num_levels - 1 - s])
        assert (cond.context_levels[s * T:(s + 1) * T] == cfg.num_levels - s).all()
    assert torch.allclose(cond.pooled, levels[-1].mean(1))
    inverted = tiny_model("inverted").condition(levels)
    assert torch.allclose(inverted.pooled, levels[0].mean(1))   # "seeded with e_1" (Table 4)


def test_cross_mask_rows_follow_the_schedule():
    model = tiny_model()
    cfg = model.cfg
    cond = model.condition(random_inputs(cfg)[0])
    mask = model.cross_mask(cond)
    T, M = cfg.tokens_per_level, cfg.num_levels
    for sl, h in zip(scale_slices(cfg), routing_table(cfg)):
        expected = torch.zeros(cfg.context_len, dtype=torch.bool)
        expected[(M - h) * T:(M - h + 1) * T] = True
        assert (mask[sl] == expected).all()


@pytest.mark.parametrize("cross_rope", [False, True])
@pytest.mark.parametrize("routing", ["scale-aware", "inverted", "single", "none"])
def test_teacher_forced_logits_equal_scale_by_scale_cached_logits(routing, cross_rope):
    model = tiny_model(routing, cross_rope=cross_rope)
    cfg = model.cfg
    levels, tf_input = random_inputs(cfg)
    cond = model.condition(levels)
    with torch.no_grad():
        full = model(tf_input, cond=cond)
        cache = model.cross_attn_cache(cond)
        per_scale, tf_start = [], 0
        for si, pn in enumerate(cfg.scales):
            x_in = None if si == 0 else tf_input[:, tf_start:tf_start + pn * pn]
            tf_start += 0 if si == 0 else pn * pn
            per_scale.append(model.forward_scale(si, x_in, cond, cache))
    stepwise = torch.cat(per_scale, dim=1)
    assert stepwise.shape == full.shape == (2, cfg.seq_len, cfg.vocab_size)
    assert full.abs().max() > 1          # not a degenerate all-zero comparison
    torch.testing.assert_close(stepwise, full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("routing", ["scale-aware", "inverted", "single"])
@pytest.mark.parametrize("path", ["teacher-forced", "cached"])
def test_each_scale_reads_only_its_own_context_segment(routing, path):
    """Perturb one context segment at a time (pooled vector held fixed): the logits of scale k
    change exactly when the segment is the one of e_{h_k}."""
    model = tiny_model(routing)
    cfg = model.cfg
    levels, tf_input = random_inputs(cfg)
    base = model.condition(levels)
    T, M = cfg.tokens_per_level, cfg.num_levels

    def logits(cond):
        with torch.no_grad():
            if path == "teacher-forced":
                return model(tf_input, cond=cond)
            out, start = [], 0
            for si, pn in enumerate(cfg.scales):
                x_in = None if si == 0 else tf_input[:, start:start + pn * pn]
                start += 0 if si == 0 else pn * pn
                out.append(model.forward_scale(si, x_in, cond))
            return torch.cat(out, dim=1)

    reference = logits(base)
    for m in range(1, M + 1):
        context = base.context.clone()
        segment = slice((M - m) * T, (M - m + 1) * T)
        context[:, segment] += 3 * torch.randn_like(context[:, segment])
        moved = logits(Condition(context, base.pooled, base.context_levels))
        for sl, h in zip(scale_slices(cfg), routing_table(cfg)):
            diff = (moved[:, sl] - reference[:, sl]).abs().max().item()
            if h == m:
                assert diff > 1e-3, f"scale reading e_{h} ignores its own segment"
            else:
                assert diff == 0.0, f"scale reading e_{h} sees e_{m} (diff {diff})"


def test_no_routing_lets_every_scale_see_everything():
    model = tiny_model("none")
    cfg = model.cfg
    levels, tf_input = random_inputs(cfg)
    base = model.condition(levels)
    assert model.cross_mask(base) is None
    context = base.context.clone()
    context[:, :cfg.tokens_per_level] += 1.0
    with torch.no_grad():
        a = model(tf_input, cond=base)
        b = model(tf_input, cond=Condition(context, base.pooled, base.context_levels))
    for sl in scale_slices(cfg):
        assert (a[:, sl] - b[:, sl]).abs().max() > 1e-3


@pytest.mark.parametrize("cross_rope", [False, True])
def test_cross_rope_makes_cross_attention_see_where_a_patch_is(cross_rope):
    """Attention is blind to the order of its keys: swapping two patch tokens of every level
    changes nothing without cross_rope, and changes the logits with it (the keys carry their
    place on the image)."""
    model = tiny_model(cross_rope=cross_rope)
    cfg = model.cfg
    levels, tf_input = random_inputs(cfg)
    order = torch.arange(cfg.tokens_per_level)
    order[[1, cfg.tokens_per_level - 1]] = order[[cfg.tokens_per_level - 1, 1]]   # two corner patches
    with torch.no_grad():
        a = model(tf_input, levels)
        b = model(tf_input, [e[:, order] for e in levels])
    moved = (a - b).abs().max().item()
    assert moved > 1e-3 if cross_rope else moved < 1e-5


def test_image_plane_angles_put_cells_at_their_centres():
    from mindhier.generator.blocks import context_plane_angles, image_plane_angles, rope_frequencies

    hd, theta, size = 16, 100.0, 64
    base = rope_frequencies(hd, theta)
    angles = image_plane_angles((1, 2, 4), hd, theta, size)
    assert angles.shape == (1 + 4 + 16, hd // 2)
    torch.testing.assert_close(angles[0], torch.cat([base, base]) * 32)          # 1×1: the centre
    torch.testing.assert_close(angles[1], torch.cat([base, base]) * 16)          # 2×2 top-left: (16, 16)
    torch.testing.assert_close(angles[2], torch.cat([base * 48, base * 16]))      # 2×2 top-right: x 48, y 16
    # the 4×4 cell (row 1, col 2) covers x in [32, 48], y in [16, 32]: centre (40, 24)
    torch.testing.assert_close(angles[5 + 1 * 4 + 2], torch.cat([base * 40, base * 24]))
    ctx = context_plane_angles(4, 3, hd, theta, size)
    assert ctx.shape == (3 * 17, hd // 2)
    torch.testing.assert_close(ctx[17:34], image_plane_angles((1, 4), hd, theta, size))   # CLS + patches per level


def test_cross_rope_needs_cls_plus_a_square_grid_of_tokens():
    with pytest.raises(ConfigError, match="1 \\+ a square"):
        dataclasses.replace(PRESETS["tiny"], tokens_per_level=20, cross_rope=True)
    assert dataclasses.replace(PRESETS["tiny"], tokens_per_level=65, cross_rope=True).context_grid == 8


def test_self_attention_never_crosses_scales():
    """Changing the input of one scale leaves the logits of every other scale untouched."""
    model = tiny_model()
    cfg = model.cfg
    levels, tf_input = random_inputs(cfg)
    with torch.no_grad():
        a = model(tf_input, levels)
        changed = tf_input.clone()
        changed[:, 13:29] += 1.0     # tf_input row j is token j+1: scale index 3 (4×4) = tokens 14..29
        b = model(changed, levels)
    sl = scale_slices(cfg)
    assert sl[3] == slice(14, 30)
    for si, s in enumerate(sl):
        diff = (a[:, s] - b[:, s]).abs().max().item()
        assert (diff > 1e-4) if si == 3 else (diff == 0.0)


# ---------------------------------------------------------------------------------------------
# Shapes, errors, configs
# ---------------------------------------------------------------------------------------------

def test_bad_inputs_fail_with_clear_messages():
    model = tiny_model()
    cfg = model.cfg
    levels, tf_input = random_inputs(cfg)
    with pytest.raises(GeneratorInputError, match="M=4 encoder levels"):
        model.condition(levels[:3])
    with pytest.raises(GeneratorInputError, match="level e_2 has shape"):
        model.condition([levels[0], levels[1][:, :5]] + levels[2:])
    with pytest.raises(GeneratorInputError, match="teacher-forcing input has shape"):
        model(tf_input[:, :-1], levels)
    with pytest.raises(GeneratorInputError, match="needs to know which level"):
        model(tf_input, cond=Condition(torch.cat(levels, 1), levels[-1].mean(1)))
    with pytest.raises(GeneratorInputError, match="scale 2 input"):
        model.forward_scale(2, tf_input[:, :3], model.condition(levels))


def test_presets_round_trip_and_paper_size():
    for name, cfg in PRESETS.items():
        assert from_dict(GeneratorConfig, to_dict(cfg)) == cfg, name
    paper = PRESETS["paper"]
    assert (paper.depth, paper.width, paper.num_heads, paper.ffn_hidden) == (30, 1920, 30, 5120)
    assert paper.seq_len == 2240 and paper.context_dim == 768
    with torch.device("meta"):
        n = ScaleAwareGenerator(paper).num_params()
    assert 2.25e9 < n < 2.35e9   # ≈ 2.3 B (Switti-512's 2.47 B minus the 2048-wide context path)


def test_bf16_cast_keeps_float32_rope_and_matches_autocast_closely():
    model = tiny_model()
    levels, tf_input = random_inputs(model.cfg)
    with torch.no_grad():
        ref = model(tf_input, levels)
        low = model.to(torch.bfloat16)(tf_input, levels)
    assert model.rope_table("cpu").dtype == torch.complex64
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().mean() < 0.1 * ref.abs().mean()


def test_bf16_autocast_forward_runs_and_stays_close():
    model = tiny_model()
    levels, tf_input = random_inputs(model.cfg)
    with torch.no_grad():
        ref = model(tf_input, levels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(tf_input, levels)
    assert low.shape == ref.shape
    assert (low.float() - ref).abs().mean() < 0.1 * ref.abs().mean()


# ---------------------------------------------------------------------------------------------
# Starting from Switti-512
# ---------------------------------------------------------------------------------------------

def test_switti_512_keys_all_accounted_for_on_meta_device():
    keys = json.loads(needs_reference("switti_512_keys.json").read_text())
    state = {k: torch.empty(shape, device="meta") for k, shape in keys["state_dict"].items()}
    assert len(state) == 705
    with torch.device("meta"):
        model = ScaleAwareGenerator(PRESETS["paper"])
    report = load_switti_weights(model, state)

    for key in state:
        ours = switti_key_to_ours(key)
        assert key in report.not_used or ours in report.loaded or ours in report.reinitialised, key
    own = {n for n, _ in model.named_parameters()}
    assert set(report.loaded) | set(report.reinitialised) == own
    assert "2048" in report.reinitialised["blocks.0.cross_attn.kv.weight"]
    assert "re-initialised" in report.reinitialised["blocks.0.cross_attn.kv.bias"]
    assert "2048" in report.reinitialised["blocks.29.context_norm.weight"]
    assert "pooler" in report.reinitialised["cond_proj.weight"]
    assert "crop" in report.not_used["crop_proj.weight"]
    assert "crop" in report.not_used["blocks.7.crop_cond_scales"]
    assert "blocks.0.self_attn.qkv.weight" in report.loaded
    assert "head.proj.weight" in report.loaded and "scale_embed.weight" in report.loaded
    assert len(report.loaded) == 705 - 35 - 3 * 30 - 2   # minus not-used, kv weight+bias, context norms, pooler
    assert "re-initialised" in report.summary()


def test_switti_loader_refuses_a_foreign_checkpoint(tmp_path):
    model = tiny_model()
    with pytest.raises(SwittiWeightsError, match="not a Switti generator checkpoint"):
        load_switti_weights(model, {"encoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(SwittiWeightsError, match="only .safetensors"):
        path = tmp_path / "switti.pt"
        path.write_bytes(b"")
        load_switti_weights(model, path)


def test_switti_loader_copies_values():
    """Round trip: a tiny model's weights renamed to Switti keys load back identically."""
    src = tiny_model(seed=3)
    ours_to_switti = {}
    candidates = [
        "word_embed.weight", "word_embed.bias", "text_pooler.weight", "text_pooler.bias", "pos_start",
        "lvl_embed.weight", "head_nm.ada_lin.1.weight", "head_nm.ada_lin.1.bias", "head.weight", "head.bias",
    ]
    for i in range(src.cfg.depth):
        for part in ["attn.to_qkv", "attn.proj", "cross_attn.to_q", "cross_attn.to_kv", "cross_attn.proj",
                     "ada_lin.1"]:
            candidates += [f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"]
        candidates += [f"blocks.{i}.ffn.{p}_proj.weight" for p in ("up", "down", "gate")]
        candidates += [f"blocks.{i}.{n}.weight" for n in (
            "self_attention_norm1", "self_attention_norm2", "cross_attention_norm1",
            "cross_attention_norm2", "ffn_norm1", "ffn_norm2", "attention_y_norm")]
    own = dict(src.named_parameters())
    for key in candidates:
        ours_to_switti[switti_key_to_ours(key)] = key
    assert set(ours_to_switti) == set(own)
    state = {ours_to_switti[n]: p.detach().clone() for n, p in own.items()}
    dst = tiny_model(seed=4)
    report = load_switti_weights(dst, state)
    assert not report.reinitialised and not report.not_used
    for n, p in dst.named_parameters():
        assert torch.equal(p, own[n]), n


def test_activation_checkpointing_changes_neither_loss_nor_gradients():
    """Recomputing each block in the backward pass (the paper-size training setting) is the
    same function: the same loss and, here in fp32, the same gradients bit for bit."""
    model = tiny_model().train()
    cfg = model.cfg
    levels, tf_input = random_inputs(cfg)
    targets = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(2))

    def loss_and_grads(checkpointing):
        model.zero_grad(set_to_none=True)
        model.checkpoint_activations = checkpointing
        loss = torch.nn.functional.cross_entropy(model(tf_input, levels).flatten(0, 1), targets.flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, recomputed = loss_and_grads(False), loss_and_grads(True)
    assert torch.equal(plain[0], recomputed[0])
    assert plain[1].keys() == recomputed[1].keys()
    for name, grad in plain[1].items():
        assert torch.equal(grad, recomputed[1][name]), name
