"""bench/device_check.py's sampling sections: the two correctness checks and the
reconstruction speed, on one stack (encoder and tokenizer from their checkpoints, the CLIP
folder for best-of-N, a random generator of the preset in bf16 where that is fast, as
``mindhier.Pipeline`` casts it)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

import bench_generator as bg
import device_check_setup as setup

TOLERANCE = {torch.bfloat16: 0.03, torch.float32: 1e-4}   # relative RMS, cached vs teacher forced


@dataclass
class Stack:
    encoder: torch.nn.Module
    tokenizer: torch.nn.Module
    generator: torch.nn.Module
    vision: torch.nn.Module
    voxels: torch.Tensor

    def autocast(self):
        from mindhier.runtime import autocast

        return autocast(self.voxels.device)


def open_branches(generator, seed: int = 0) -> None:
    """Random weights at which every branch matters: a fresh generator starts with the gates of
    its residual branches almost closed (VAR/Switti init), so a broken self-attention or FFN
    path would hardly change its logits. Every matrix is redrawn with std 1/√fan_in and the
    gates open at 1, so the correctness checks see every path."""
    torch.manual_seed(seed)
    C = generator.cfg.width
    with torch.no_grad():
        for p in generator.parameters():
            if p.ndim == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
        for block in generator.blocks:
            block.adaln.bias[: 2 * C].fill_(1.0)


def sampling_stack(check) -> Stack:
    """Encoder and tokenizer from their checkpoints, the CLIP folder for best-of-N, and a random
    generator of the preset built on the device and cast to bf16 where that is fast (as
    :class:`mindhier.Pipeline` does)."""
    if check.stack is None:
        from mindhier.encoder import load_encoder
        from mindhier.generator import PRESETS, ScaleAwareGenerator
        from mindhier.pipeline import generator_config_for
        from mindhier.tokenizer import load_tokenizer
        from mindhier.vision import load_vision

        dev, s = check.device, check.sizes
        encoder, _ = load_encoder(check.path("encoder/encoder"), device=dev)
        tokenizer = load_tokenizer(check.path("tokenizer/tokenizer"), device=dev)
        torch.manual_seed(0)
        with torch.device(dev):
            generator = ScaleAwareGenerator(generator_config_for(PRESETS[s.generator], encoder, tokenizer))
        open_branches(generator)
        if setup.bf16_is_fast(dev):
            generator = generator.to(torch.bfloat16)
        voxels = torch.randn(max(8, *s.recon_batches), s.voxels, generator=torch.Generator().manual_seed(0))
        check.stack = Stack(encoder, tokenizer, generator.eval(), load_vision(check.path("clip-vit"), device=dev),
                            voxels.to(dev))
    return check.stack


@torch.no_grad()
def check_cached_equals_teacher_forced(stack: Stack, batch: int = 2) -> dict:
    """Logits of every scale sampled one at a time from the K/V cache (``forward_scale``) against
    the teacher-forced logits of the whole pyramid, for random token maps."""
    from mindhier.pipeline import encode_conditions

    gen, tok = stack.generator, stack.tokenizer
    cfg, dev = gen.cfg, stack.voxels.device
    g = torch.Generator(device=dev).manual_seed(1)
    indices = [torch.randint(0, cfg.vocab_size, (batch, pn * pn), generator=g, device=dev) for pn in cfg.scales]
    with stack.autocast():
        cond, _, _ = encode_conditions(stack.encoder, gen, stack.voxels[:batch])
        tf_input = tok.teacher_forcing_input(indices)
        full = gen(tf_input, cond=cond).float()
        cache, parts = gen.cross_attn_cache(cond), []
        for si in range(cfg.num_scales):
            lo, hi = (o - cfg.first_len for o in gen.scale_offsets[si:si + 2])
            parts.append(gen.forward_scale(si, None if si == 0 else tf_input[:, lo:hi], cond, cache).float())
    cached = torch.cat(parts, dim=1)
    rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-12))  # noqa: E731
    offsets = gen.scale_offsets
    per_scale = [rel(cached[:, a:b], full[:, a:b]) for a, b in zip(offsets, offsets[1:])]
    tolerance = TOLERANCE.get(gen.dtype, TOLERANCE[torch.bfloat16])
    return {"batch": batch, "dtype": str(gen.dtype).replace("torch.", ""), "rms_relative": rel(cached, full),
            "rms_relative_per_scale": per_scale, "max_abs_diff": float((cached - full).abs().max()),
            "max_abs_logit": float(full.abs().max()),
            "argmax_agreement": float((cached.argmax(-1) == full.argmax(-1)).float().mean()),
            "tolerance": tolerance, "passed": rel(cached, full) <= tolerance}


def _same_images(together, alone: list, num_scales: int) -> dict:
    """Batch-n reconstructions against the same images reconstructed one at a time."""
    n = together.single_shot.shape[0]
    images = torch.cat([a.single_shot for a in alone])
    tokens = [torch.cat([a.indices["single-shot"][k] for a in alone]) for k in range(num_scales)]
    agree = sum(int((t == u).sum()) for t, u in zip(tokens, together.indices["single-shot"]))
    identical = sum(bool(torch.equal(together.single_shot[i], images[i])) for i in range(n))
    return {"images_identical": identical, "images": n, "token_agreement": agree / sum(t.numel() for t in tokens),
            "max_abs_pixel_diff": float((together.single_shot.float() - images.float()).abs().max()),
            "passed": identical == n}


@torch.no_grad()
def check_batch_invariance(stack: Stack, n: int = 8) -> dict:
    """The same seeds give the same images at batch 1 and batch n: end to end (the encoder runs
    at the batch size too, as ``Pipeline`` runs it), and given the same conditions (sampling and
    decoding alone), so that a difference can be placed. Also the encoder's largest difference."""
    from mindhier.pipeline import encode_conditions, predict_hierarchy
    from mindhier.sampling import SamplingSettings, reconstruct

    gen, tok, voxels = stack.generator, stack.tokenizer, stack.voxels[:n]
    settings, K = SamplingSettings(cfg=6.0, num_candidates=1, seed=0), gen.cfg.num_scales
    with stack.autocast():
        cond, null, _ = encode_conditions(stack.encoder, gen, voxels)
        together = reconstruct(gen, tok, cond, null, settings, list(range(n)))
        given = [reconstruct(gen, tok, cond.take(slice(i, i + 1)), null.take(slice(i, i + 1)), settings, [i])
                 for i in range(n)]
        alone = []
        for i in range(n):
            c, z, _ = encode_conditions(stack.encoder, gen, voxels[i:i + 1])
            alone.append(reconstruct(gen, tok, c, z, settings, [i]))
        levels = predict_hierarchy(stack.encoder, voxels)[0]
        single = [predict_hierarchy(stack.encoder, voxels[i:i + 1])[0] for i in range(n)]
    encoder_diff = max(float((e - torch.cat([s[m] for s in single])).abs().max()) for m, e in enumerate(levels))
    end_to_end = _same_images(together, alone, K)
    return {"batch": n, "end_to_end": end_to_end, "given_conditions": _same_images(together, given, K),
            "encoder_max_abs_diff": encoder_diff, "passed": end_to_end["passed"]}


def correctness(check) -> dict:
    stack = sampling_stack(check)
    return {"cached_vs_teacher_forced": check_cached_equals_teacher_forced(stack),
            "batch_invariance": check_batch_invariance(stack)}


@torch.no_grad()
def time_reconstruction(stack: Stack, batch: int, candidates: int, cfg_off_from: int | None) -> dict:
    """Seconds of one ``sampling.reconstruct`` call and of its parts: encoder, K/V cache, every
    scale, decode, and (best-of-N) the vision model's ranking."""
    from mindhier.pipeline import encode_conditions
    from mindhier.sampling import SamplingSettings, reconstruct

    dev = stack.voxels.device
    settings = SamplingSettings(cfg=6.0, top_k=400, top_p=0.95, cfg_off_from=cfg_off_from,
                                num_candidates=candidates)
    marks, ranking = [], [0.0]

    def embed(images01):
        t = setup.now(dev)
        emb = stack.vision.image_embedding(images01)
        ranking[0] += setup.now(dev) - t
        return emb

    with stack.autocast():
        t0 = setup.now(dev)
        cond, null, predicted = encode_conditions(stack.encoder, stack.generator, stack.voxels[:batch])
        t1 = setup.now(dev)
        reconstruct(stack.generator, stack.tokenizer, cond, null, settings, list(range(batch)), predicted=predicted,
                    embed_images=embed if candidates > 1 else None, on_scale=lambda si: marks.append(setup.now(dev)))
        t2 = setup.now(dev)
    return {"encoder": t1 - t0, "kv_cache": marks[0] - t1, "scales": [b - a for a, b in zip(marks, marks[1:])],
            "decode": t2 - marks[-1] - ranking[0], "rank": ranking[0], "generator": marks[-1] - t1, "total": t2 - t0}


def bench_setting(check, stack: Stack, batch: int, candidates: int, cfg_off_from: int | None) -> dict:
    cfg, K = stack.generator.cfg, stack.generator.cfg.num_scales
    runs = [time_reconstruction(stack, batch, candidates, cfg_off_from) for _ in range(check.sizes.repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in ("encoder", "kv_cache", "decode", "rank", "generator", "total")}
    med["scales"] = [statistics.median(r["scales"][k] for r in runs) for k in range(K)]
    sequences = batch * candidates
    rows = [2 * sequences if cfg_off_from is None or k < cfg_off_from else sequences for k in range(K)]
    flops = [bg.scale_flops(cfg, k, rows[k]) for k in range(K)]
    total = sum(flops) + bg.cache_flops(cfg, 2 * sequences)
    rate = total / med["generator"]
    scale_rates = [f / max(t, 1e-9) for f, t in zip(flops, med["scales"])]
    peak = check.peak_bf16
    return {"batch": batch, "candidates": candidates, "cfg_off_from": cfg_off_from, "seconds": med,
            "seconds_per_image": med["total"] / batch, "images_per_s": batch / med["total"],
            "generator_flops": total, "generator_flop_per_s": rate, "mfu": rate / peak if peak else None,
            "scale_flop_per_s": scale_rates, "scale_mfu": [r / peak for r in scale_rates] if peak else None}


def reconstruction_settings(sizes: setup.Sizes, num_scales: int) -> list[tuple[int, int, int | None]]:
    """(batch, candidates, cfg_off_from): batch 1 single-shot and best-of-4, then the batched
    sizes single-shot; each with CFG at every scale and off for the last two."""
    offs = (None, num_scales - 2)
    return ([(1, n, off) for n in (1, 4) for off in offs]
            + [(b, 1, off) for b in sizes.recon_batches for off in offs])


def reconstruction(check) -> dict:
    stack = sampling_stack(check)
    runs, warmed, skipped = [], set(), []
    for batch, candidates, off in reconstruction_settings(check.sizes, stack.generator.cfg.num_scales):
        if not check.budget.ok():
            skipped.append({"batch": batch, "candidates": candidates, "cfg_off_from": off})
            continue
        if (batch, candidates) not in warmed:   # first pass of a shape: kernel selection, allocations
            time_reconstruction(stack, batch, candidates, off)
            warmed.add((batch, candidates))
        runs.append(bench_setting(check, stack, batch, candidates, off))
    return {"dtype": str(stack.generator.dtype).replace("torch.", ""), "params": stack.generator.num_params(),
            "scales": list(stack.generator.cfg.scales), "runs": runs, "skipped_for_budget": skipped}
