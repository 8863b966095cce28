"""Sampler: filtering, the CFG ramp against teacher forcing, per-image seeding, best-of-N."""

import dataclasses

import pytest
import torch

import mindhier.sampling as sampling
from mindhier.generator import PRESETS as GEN_PRESETS
from mindhier.generator import ScaleAwareGenerator
from mindhier.sampling import (
    SamplingError,
    SamplingSettings,
    filter_logits,
    guidance_weight,
    image_seed,
    reconstruct,
    sample_indices,
)
from mindhier.tokenizer import PRESETS as TOK_PRESETS
from mindhier.tokenizer import MultiScaleVQVAE


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    tok_cfg = TOK_PRESETS["tiny"]
    tokenizer = MultiScaleVQVAE(tok_cfg).eval()
    gen_cfg = dataclasses.replace(GEN_PRESETS["tiny"], scales=tok_cfg.scales, vocab_size=tok_cfg.vocab_size,
                                  z_channels=tok_cfg.z_channels)
    generator = ScaleAwareGenerator(gen_cfg).eval()
    with torch.no_grad():                      # move away from the near-identity init
        for p in generator.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return generator, tokenizer


def conditions(generator, batch, seed=5):
    cfg = generator.cfg
    g = torch.Generator().manual_seed(seed)
    levels = [torch.randn(batch, cfg.tokens_per_level, cfg.context_dim, generator=g) for _ in range(cfg.num_levels)]
    null = [torch.randn(1, cfg.tokens_per_level, cfg.context_dim, generator=g).expand(batch, -1, -1)
            for _ in range(cfg.num_levels)]
    return generator.condition(levels), generator.condition(null)


def rngs_for(ids, seed=0):
    return [torch.Generator().manual_seed(image_seed(seed, i)) for i in ids]


def test_filter_logits_known_answers():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    kept = filter_logits(logits, top_k=2, top_p=1.0).isfinite()
    assert kept.tolist() == [[False, True, True, False]]
    probs = torch.tensor([[0.2, 0.5, 0.3]]).log()
    # nucleus: the smallest most-likely set whose mass reaches p
    assert filter_logits(probs, 0, 0.6).isfinite().tolist() == [[False, True, True]]
    assert filter_logits(probs, 0, 0.5).isfinite().tolist() == [[False, True, False]]
    assert filter_logits(probs, 0, 0.81).isfinite().tolist() == [[True, True, True]]
    assert filter_logits(probs, 0, 1e-6).isfinite().tolist() == [[False, True, False]]  # top-1 survives


def test_guidance_ramp_is_linear_from_zero_to_cfg():
    assert [guidance_weight(6.0, k, 4) for k in range(4)] == [0.0, 2.0, 4.0, 6.0]


def test_image_seed_depends_on_all_three_parts():
    seeds = {image_seed(s, i, c) for s in (0, 1) for i in (0, 1, 2) for c in (0, 1)}
    assert len(seeds) == 12
    assert image_seed(3, 7, 1) == image_seed(3, 7, 1)


@pytest.mark.parametrize("cfg_off_from", [None, 2])
def test_sampled_logits_are_the_teacher_forced_cfg_combination(models, monkeypatch, cfg_off_from):
    """Record the logits the sampler filters at each scale; recompute them by teacher forcing
    on the sampled tokens with (1+t)·cond − t·null (cond only from scale cfg_off_from on)."""
    generator, tokenizer = models
    cond, null = conditions(generator, batch=2)
    settings = SamplingSettings(cfg=3.0, top_k=10, top_p=0.9, cfg_off_from=cfg_off_from, num_candidates=1)
    seen = []
    real_filter = sampling.filter_logits
    monkeypatch.setattr(sampling, "filter_logits", lambda lg, k, p: seen.append(lg.clone()) or real_filter(lg, k, p))
    indices = sample_indices(generator, tokenizer, cond, null, settings, rngs_for([0, 1]))

    with torch.no_grad():
        tf = tokenizer.teacher_forcing_input(indices)
        c, u = generator(tf, cond=cond), generator(tf, cond=null)
    start, K = 0, len(indices)
    for si, pn in enumerate(generator.cfg.scales):
        rows = slice(start, start + pn * pn)
        start += pn * pn
        t = guidance_weight(3.0, si, K)
        on = cfg_off_from is None or si < cfg_off_from
        expected = (1 + t) * c[:, rows] - t * u[:, rows] if on else c[:, rows]
        torch.testing.assert_close(seen[si], expected, atol=1e-4, rtol=1e-4)
    # tokens are drawn from the filtered support only
    for si, idx in enumerate(indices):
        allowed = real_filter(seen[si], 10, 0.9).isfinite()
        assert allowed.gather(-1, idx[..., None]).all()


def test_same_command_same_images_at_any_batch_size(models):
    generator, tokenizer = models
    cond, null = conditions(generator, batch=3)
    settings = SamplingSettings(cfg=2.0, top_k=20, top_p=0.95, num_candidates=1, seed=11)
    together = reconstruct(generator, tokenizer, cond, null, settings, image_ids=[10, 11, 12])
    for b in range(3):
        alone = reconstruct(generator, tokenizer, cond.take([b]), null.take([b]), settings, image_ids=[10 + b])
        for k, (a, t) in enumerate(zip(alone.indices["single-shot"], together.indices["single-shot"])):
            assert torch.equal(a[0], t[b]), f"image {b} scale {k} differs between batch 1 and batch 3"
        torch.testing.assert_close(alone.single_shot[0], together.single_shot[b], atol=1e-5, rtol=0)
    again = reconstruct(generator, tokenizer, cond, null, settings, image_ids=[10, 11, 12])
    assert torch.equal(again.single_shot, together.single_shot)
    other = reconstruct(generator, tokenizer, cond, null, dataclasses.replace(settings, seed=12),
                        image_ids=[10, 11, 12])
    assert any(not torch.equal(a, b) for a, b in zip(other.indices["single-shot"], together.indices["single-shot"]))


def test_best_of_n_ranks_by_the_predicted_embedding(models):
    generator, tokenizer = models
    cond, null = conditions(generator, batch=2)
    embed = lambda imgs: imgs.mean(dim=(2, 3))              # a stand-in "vision embedding": mean colour
    predicted = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.1, 0.9]])
    settings = SamplingSettings(cfg=1.0, top_k=0, top_p=1.0, num_candidates=3, seed=4)
    out = reconstruct(generator, tokenizer, cond, null, settings, image_ids=[0, 1],
                      predicted=predicted, embed_images=embed, return_cumulative=True)
    assert out.labels == ["single-shot", "best-of-3"]
    assert out.scores.shape == (2, 3)
    # independent ranking of the N candidates (re-decoded from their own seeds)
    single = SamplingSettings(cfg=1.0, top_k=0, top_p=1.0, num_candidates=1, seed=4)
    for b in range(2):
        sims = []
        cands = []
        for c in range(3):
            rng = [torch.Generator().manual_seed(image_seed(4, b, c))]
            idx = sample_indices(generator, tokenizer, cond.take([b]), null.take([b]), single, rng)
            img = tokenizer.output_to_images01(tokenizer.indices_to_img(idx))
            cands.append(img)
            sims.append(torch.cosine_similarity(embed(img), predicted[b:b + 1]).item())
        assert int(out.chosen[b]) == max(range(3), key=lambda c: sims[c])
        torch.testing.assert_close(out.best_of_n[b], cands[int(out.chosen[b])][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.single_shot[b], cands[0][0], atol=1e-5, rtol=0)
    # candidate 0 is exactly what a single-shot run gives
    plain = reconstruct(generator, tokenizer, cond, null, single, image_ids=[0, 1])
    assert plain.best_of_n is None and plain.labels == ["single-shot"]
    torch.testing.assert_close(plain.single_shot, out.single_shot, atol=1e-5, rtol=0)
    # coarse-to-fine pictures: one per scale, the last is the final image
    for label in out.labels:
        steps = out.cumulative[label]
        assert len(steps) == len(generator.cfg.scales)
        torch.testing.assert_close(steps[-1], out.by_label(label), atol=1e-5, rtol=0)


def test_sampler_errors(models):
    generator, tokenizer = models
    cond, null = conditions(generator, batch=2)
    with pytest.raises(SamplingError, match="predicted embedding"):
        reconstruct(generator, tokenizer, cond, null, SamplingSettings(num_candidates=2), image_ids=[0, 1])
    with pytest.raises(SamplingError, match="image ids"):
        reconstruct(generator, tokenizer, cond, null, SamplingSettings(num_candidates=1), image_ids=[0])
    with pytest.raises(SamplingError, match="top_p"):
        SamplingSettings(top_p=0.0)
    other = MultiScaleVQVAE(TOK_PRESETS["demo"]).eval()
    with pytest.raises(SamplingError, match="tokenizer scales"):
        sample_indices(generator, other, cond, null, SamplingSettings(), rngs_for([0, 1]))
