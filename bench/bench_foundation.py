"""Training throughput of the demo's foundation models (issue 11), as a share of the matmul peak
measured in the same run: the world reader, the small CLIP, the foundation tokenizer and the
generator pretraining step (random weights and inputs of the real shapes; the step is what the
training commands run: forward, loss, backward, AdamW).

    python bench/bench_foundation.py                        # all four, 5 timed steps each
    python bench/bench_foundation.py --only reader tokenizer --steps 3 --out bench/results

FLOPs per step are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one step
(matmuls and convolutions, forward and backward), so the share of peak needs no hand-written
formula. The peak is the best n×n×n matmul rate over ~3 s (fp32, and bf16 where the CPU has
native bf16: the training commands use bf16 only there). Writes NAME.json and NAME.md to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generator import matmul_peak  # noqa: E402

from mindhier.checkpoint import git_commit  # noqa: E402
from mindhier.runtime import autocast, bf16_is_fast, platform_fingerprint  # noqa: E402


def reader_step(b: int = 128):
    from mindhier.world.reader import PRESETS, WorldReader, loss_fn

    model = WorldReader(PRESETS["demo"])
    x = torch.rand(b, 3, 64, 64)
    y = {k: torch.randint(0, n, (b,)) for k, n in (("main_category", 12), ("main_colour", 12), ("main_cell", 9),
                                                     ("background_kind", 5), ("background_colour", 12))}
    y["present"] = torch.randint(0, 2, (b, 12))
    return model, lambda: loss_fn(model(x), y), f"batch {b}"


def vision_step(b: int = 128):
    from mindhier.vision.small_clip import PRESETS, SmallClipModel

    cfg = PRESETS["demo"].__class__(**{**PRESETS["demo"].__dict__, "vocab_size": 67})
    model = SmallClipModel(cfg)
    pixels = torch.randn(b, 3, 64, 64)
    ids = torch.randint(4, 67, (b, cfg.text_len))

    def step():
        image, text, scale = model(pixels, ids)
        logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
        labels = torch.arange(b)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    return model, step, f"batch {b}"


def tokenizer_step(b: int = 16):
    from mindhier.tokenizer import PRESETS, MultiScaleVQVAE

    model = MultiScaleVQVAE(PRESETS["foundation"])
    x = torch.rand(b, 3, 64, 64) * 2 - 1

    def step():
        out = model(x)
        recon, vq = out[0], out[1]
        return F.l1_loss(recon, x) + F.mse_loss(recon, x) + vq
    return model, step, f"batch {b} (foundation preset)"


def generator_step(b: int = 32):
    import dataclasses

    from mindhier.generator import PRESETS, ScaleAwareGenerator

    cfg = dataclasses.replace(PRESETS["demo"], vocab_size=4096, z_channels=32, tokens_per_level=65, level_norm=True)
    model = ScaleAwareGenerator(cfg)
    tf_input = torch.randn(b, cfg.seq_len - cfg.first_len, cfg.z_channels)
    levels = [torch.randn(b, cfg.tokens_per_level, cfg.context_dim) for _ in range(cfg.num_levels)]
    targets = torch.randint(0, cfg.vocab_size, (b, cfg.seq_len))

    def step():
        logits = model(tf_input, levels)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    return model, step, f"batch {b}, 130 tokens, 4 x 65 context tokens"


MODELS = {"reader": reader_step, "vision": vision_step, "tokenizer": tokenizer_step, "generator": generator_step}


def measure(name: str, steps: int, device: torch.device, batch: int | None = None) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    model, loss_of, shape = MODELS[name](batch) if batch else MODELS[name]()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def one():
        with autocast(device):
            loss = loss_of()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    counter = FlopCounterMode(display=False)
    with counter:
        one()  # also the warm-up
    flops = counter.get_total_flops()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        one()
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    return {"model": name, "shape": shape, "params": sum(p.numel() for p in model.parameters()),
            "flops_per_step": flops, "seconds_per_step": median, "flop_per_s": flops / median}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    p.add_argument("--steps", type=int, default=5, help="timed steps per model (median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="write bench_foundation.json and .md into this folder")
    p.add_argument("--batch", type=int, default=None, help="one batch size for every model (default: each recipe's)")
    p.add_argument("--peak-seconds", type=float, default=3.0, help="how long to measure the matmul peak")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    peak_fp32 = matmul_peak(torch.float32, 1024, device, args.peak_seconds)
    bf16 = bf16_is_fast(device)
    peak = matmul_peak(torch.bfloat16, 1024, device, args.peak_seconds) if bf16 else peak_fp32
    rows = [measure(name, args.steps, device, args.batch) for name in args.only]
    for r in rows:
        r["share_of_peak"] = r["flop_per_s"] / peak
    result = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "peak_fp32_flop_per_s": peak_fp32, "training_dtype": "bf16" if bf16 else "fp32",
              "peak_used_flop_per_s": peak, "command": "python bench/bench_foundation.py " + " ".join(argv or sys.argv[1:]),
              "rows": rows, "git_commit": git_commit(), "platform": platform_fingerprint()}
    md = markdown(result)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_foundation.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "bench_foundation.md").write_text(md + "\n")
    return result


def markdown(r: dict) -> str:
    cpu = r.get("platform", {}).get("cpu") or r["machine"]
    lines = [f"Foundation-model training steps on {cpu} ({r['threads']} threads), {r['training_dtype']}; "
             f"matmul peak {r['peak_used_flop_per_s'] / 1e9:.0f} GFLOP/s measured in the same run.",
             f"`{r['command']}` at commit `{r.get('git_commit')}`.", "",
             "| model | step | params | GFLOP/step | s/step | GFLOP/s | share of peak |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {x['model']} | {x['shape']} | {x['params'] / 1e6:.2f} M | {x['flops_per_step'] / 1e9:.1f} | "
              f"{x['seconds_per_step']:.3f} | {x['flop_per_s'] / 1e9:.1f} | {100 * x['share_of_peak']:.1f} % |"
              for x in r["rows"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
