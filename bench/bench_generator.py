"""Stage-2 speed benchmark (issue 6): this machine's matmul peak, then the reconstruction
pipeline — encoder, every scale of the scale-wise pass, decode — for the ``demo`` preset
(trained weights when checkpoints are given, else random) and the ``paper`` preset (512 px,
random weights, bf16), with CFG at every scale and with CFG off for the last two scales.

    python bench/bench_generator.py                              # demo (random) + paper
    python bench/bench_generator.py --encoder runs/encoder/encoder --tokenizer runs/tokenizer/tokenizer \\
        --generator runs/generator/generator --data worlds/demo --skip-paper
    python bench/bench_generator.py --skip-demo --paper-batch 2 --json bench_generator.json
    python bench/bench_generator.py --write-results bench/results       # the files to commit

Achieved FLOP/s count the generator's matrix products analytically (projections, attention
scores and values, FFN, head; condition projection and K/V of the context once per image) and
are compared with the bf16 matmul peak measured in the same run; tests/test_bench.py checks the
count against torch's FlopCounterMode. Timings are wall-clock medians of --repeats runs.

At the end the benchmark prints a markdown table of every run; --write-results DIR also writes
it to DIR/NAME.md beside every figure in DIR/NAME.json (NAME: --results-name, by default the
device and the date), so measured results are the benchmark's own output, not transcribed.
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

from mindhier.encoder import CLIP_VIT_L14, HierarchicalFMRIEncoder, VisionShape
from mindhier.encoder import PRESETS as ENCODER_PRESETS
from mindhier.generator import PRESETS as GENERATOR_PRESETS
from mindhier.generator import Condition, ScaleAwareGenerator
from mindhier.reconstruct import encode_conditions, generator_config_for, load_generator
from mindhier.sampling import SamplingSettings, image_seed, sample_indices
from mindhier.tokenizer import PRESETS as TOKENIZER_PRESETS
from mindhier.tokenizer import MultiScaleVQVAE

NSD_SUBJ01_VOXELS = 15724  # nsdgeneral voxels of NSD subject 1 (the paper encoder's input)


# ---------------------------------------------------------------------------------------------
# Machine peak
# ---------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, n: int, device: torch.device, seconds: float = 3.0) -> float:
    """Best FLOP/s of an n×n×n matmul in ``dtype`` over ~``seconds``."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b  # warm-up (kernel selection, page faults)
    best, spent = 0.0, 0.0
    while spent < seconds:
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        dt = time.perf_counter() - t
        spent += dt
        best = max(best, 2 * n ** 3 / dt)
    return best


# ---------------------------------------------------------------------------------------------
# Analytic FLOPs of the generator (matrix products only)
# ---------------------------------------------------------------------------------------------

def scale_flops(cfg, si: int, rows: int) -> float:
    """FLOPs of scale ``si`` for ``rows`` sequences (2·B with CFG, B without)."""
    C, H, V = cfg.width, cfg.ffn_hidden, cfg.vocab_size
    n = cfg.scales[si] ** 2
    visible = cfg.context_len if cfg.routing == "none" else cfg.tokens_per_level
    per_block = (2 * n * C * 3 * C + 2 * n * C * C          # self-attn qkv + out
                 + 2 * 2 * n * n * C                         # scores + weighted values
                 + 2 * n * C * C * 2                         # cross-attn q + out
                 + 2 * 2 * n * visible * C                   # cross scores + values
                 + 3 * 2 * n * C * H                         # SwiGLU
                 + 2 * C * 6 * C)                            # AdaLN (per sequence)
    embed = 2 * n * cfg.z_channels * C if si else 0
    head = 2 * n * C * V + 2 * C * 2 * C
    return rows * (cfg.depth * per_block + embed + head)


def cache_flops(cfg, rows: int) -> float:
    """What sampling computes once per sequence: the condition projection (pooled → C) and the
    cross-attention K/V of the whole context in every layer."""
    return rows * (2 * cfg.pooled_dim * cfg.width + cfg.depth * 2 * cfg.context_len * cfg.context_dim * 2 * cfg.width)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def demo_stack(args, device):
    """Trained demo models from checkpoints when given, else random ones of the demo presets."""
    if args.generator:
        from mindhier.data import TestSet
        from mindhier.encoder import load_encoder
        from mindhier.tokenizer import load_tokenizer

        generator, _ = load_generator(args.generator, device)
        tokenizer = load_tokenizer(args.tokenizer, device=device)
        test = TestSet(args.data, args.subject)
        encoder, _ = load_encoder(args.encoder, num_voxels=test.num_voxels, device=device)
        voxels = torch.stack([test[i]["voxels"] for i in range(args.batch)])
        return encoder, tokenizer, generator, voxels, "demo (trained weights)"
    torch.manual_seed(0)
    tokenizer = MultiScaleVQVAE(TOKENIZER_PRESETS["demo"])
    encoder = HierarchicalFMRIEncoder(ENCODER_PRESETS["demo"], 2000, VisionShape(17, 128, 40, 128))
    generator = ScaleAwareGenerator(generator_config_for(GENERATOR_PRESETS["demo"], encoder, tokenizer))
    return encoder, tokenizer, generator, torch.randn(args.batch, 2000), "demo (random weights)"


def paper_stack(args):
    """The paper's sizes with random weights; the generator is built directly in bf16 (4.6 GB)."""
    torch.manual_seed(0)
    tokenizer = MultiScaleVQVAE(TOKENIZER_PRESETS["paper"])
    encoder = HierarchicalFMRIEncoder(ENCODER_PRESETS["paper"], NSD_SUBJ01_VOXELS, CLIP_VIT_L14)
    cfg = generator_config_for(GENERATOR_PRESETS["paper"], encoder, tokenizer)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        generator = ScaleAwareGenerator(cfg)
    finally:
        torch.set_default_dtype(previous)
    return encoder, tokenizer, generator, torch.randn(args.paper_batch, NSD_SUBJ01_VOXELS), "paper (random, bf16)"


# ---------------------------------------------------------------------------------------------
# Timing one reconstruction pass
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def time_pass(encoder, tokenizer, generator, voxels, settings, device, autocast) -> dict:
    """Seconds of each component for one batch: encoder, K/V cache, each scale, decode."""
    B = voxels.shape[0]
    marks = []

    def mark(si):
        sync(device)
        marks.append((si, time.perf_counter()))

    with autocast():
        sync(device)
        t0 = time.perf_counter()
        cond, null, _ = encode_conditions(encoder, generator, voxels.to(device))
        sync(device)
        t1 = time.perf_counter()
        rngs = [torch.Generator(device=device).manual_seed(image_seed(0, i)) for i in range(B)]
        indices = sample_indices(generator, tokenizer, cond, null, settings, rngs, on_scale=mark)
        t2 = time.perf_counter()
        tokenizer.output_to_images01(tokenizer.indices_to_img(indices))
        sync(device)
        t3 = time.perf_counter()
    times = [b - a for (_, a), (_, b) in zip([(None, t1)] + marks[:-1], marks)]
    return {"encoder": t1 - t0, "kv_cache": times[0], "scales": times[1:], "decode": t3 - t2, "total": t3 - t0,
            "generator": t2 - t1}


@torch.no_grad()
def warm_up(encoder, tokenizer, generator, voxels, device, autocast) -> None:
    """Touch every weight once — page faults of freshly allocated weights (4.6 GB for the paper
    preset) and oneDNN kernel selection — without a whole pass: encoder, K/V cache, first scale
    (every block and the head) and one decode."""
    with autocast():
        cond, null, _ = encode_conditions(encoder, generator, voxels[:1].to(device))
        generator.forward_scale(0, None, Condition.cat([cond, null]))
        first = [torch.zeros(1, pn * pn, dtype=torch.long, device=device) for pn in tokenizer.scales]
        tokenizer.indices_to_img(first)
    sync(device)


def bench_config(name, encoder, tokenizer, generator, voxels, device, autocast, repeats, cfg_off_from) -> dict:
    cfg = generator.cfg
    K = cfg.num_scales
    settings = SamplingSettings(cfg=6.0, top_k=400, top_p=0.95, num_candidates=1, cfg_off_from=cfg_off_from)
    runs = [time_pass(encoder, tokenizer, generator, voxels, settings, device, autocast) for _ in range(repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in ("encoder", "kv_cache", "decode", "total", "generator")}
    med["scales"] = [statistics.median(r["scales"][k] for r in runs) for k in range(K)]
    B = voxels.shape[0]
    rows = [2 * B if cfg_off_from is None or k < cfg_off_from else B for k in range(K)]
    flops = [scale_flops(cfg, k, rows[k]) for k in range(K)]
    total_flops = sum(flops) + cache_flops(cfg, 2 * B)
    return {"name": name, "batch": B, "cfg_off_from": cfg_off_from, "seconds": med,
            "seconds_per_image": med["total"] / B, "generator_flops": total_flops,
            "generator_flop_per_s": total_flops / med["generator"],
            "scale_flop_per_s": [f / max(t, 1e-9) for f, t in zip(flops, med["scales"])]}


def print_result(r: dict, peak_bf16: float, peak_fp32: float) -> None:
    s = r["seconds"]
    off = "CFG at every scale" if r["cfg_off_from"] is None else f"CFG off from scale {r['cfg_off_from'] + 1}"
    print(f"\n{r['name']}: batch {r['batch']}, {off}")
    print(f"  total {s['total']:.3f} s ({r['seconds_per_image']:.3f} s/image) | encoder {s['encoder']:.3f} s | "
          f"K/V cache {s['kv_cache']:.3f} s | scales {s['generator'] - s['kv_cache']:.3f} s | "
          f"decode {s['decode']:.3f} s")
    print("  per scale (s): " + " ".join(f"{t:.3f}" for t in s["scales"]))
    rate = r["generator_flop_per_s"]
    print(f"  generator {r['generator_flops'] / 1e12:.2f} TFLOP in {s['generator']:.3f} s = {rate / 1e9:.1f} GFLOP/s "
          f"= {100 * rate / peak_bf16:.1f} % of bf16 peak ({100 * rate / peak_fp32:.1f} % of fp32 peak)")
    print("  per-scale GFLOP/s: " + " ".join(f"{f / 1e9:.0f}" for f in r["scale_flop_per_s"]))


# ---------------------------------------------------------------------------------------------
# The results as files: every figure (JSON) and the table this run prints (markdown)
# ---------------------------------------------------------------------------------------------

def cfg_label(r: dict) -> str:
    return "every scale" if r["cfg_off_from"] is None else f"off from scale {r['cfg_off_from'] + 1}"


def results_markdown(results: dict) -> str:
    """The run's environment, peaks and one table row per setting, then the per-scale figures."""
    env = results["environment"]
    peak = results["peak_bf16"]
    lines = [
        "# Benchmark results", "",
        f"Written by `bench/bench_generator.py` on {env['date']} (git {env['git_commit'][:12]}): "
        f"torch {env['torch']}, {env['threads']} threads, device {env['device']} ({env['processor']}).", "",
        "```bash", env["command"], "```", "",
        f"Measured matmul peak ({env['matmul_n']}³): fp32 {results['peak_fp32'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {peak / 1e9:.1f} GFLOP/s. Seconds are for the whole batch except s / image.", "",
        "| preset | batch | CFG | s / image | encoder | K/V cache | scales | decode | generator GFLOP/s | % of bf16 peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        t, rate = r["seconds"], r["generator_flop_per_s"]
        lines.append(f"| {r['name']} | {r['batch']} | {cfg_label(r)} | {r['seconds_per_image']:.3f} | "
                     f"{t['encoder']:.3f} | {t['kv_cache']:.3f} | {t['generator'] - t['kv_cache']:.3f} | "
                     f"{t['decode']:.3f} | {rate / 1e9:.1f} | {100 * rate / peak:.1f} |")
    lines += ["", "| preset | batch | CFG | seconds per scale | GFLOP/s per scale |", "|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(f"| {r['name']} | {r['batch']} | {cfg_label(r)} | "
                     + " ".join(f"{x:.3f}" for x in r["seconds"]["scales"]) + " | "
                     + " ".join(f"{f / 1e9:.0f}" for f in r["scale_flop_per_s"]) + " |")
    return "\n".join(lines) + "\n"


def environment(args, argv: list[str], device: torch.device) -> dict:
    from mindhier.checkpoint import git_commit

    return {"date": time.strftime("%Y-%m-%d %H:%M %z"), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(device),
            "processor": platform.processor() or platform.machine(), "git_commit": git_commit(),
            "matmul_n": args.matmul_n, "command": "python bench/bench_generator.py " + " ".join(argv)}


def write_results(results: dict, folder: str | Path, name: str) -> tuple[Path, Path]:
    """FOLDER/NAME.json (every figure) and FOLDER/NAME.md (the printed table)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / f"{name}.json", folder / f"{name}.md"
    paths[0].write_text(json.dumps(results, indent=1, default=float) + "\n")
    paths[1].write_text(results_markdown(results))
    return paths


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder"), p.add_argument("--tokenizer"), p.add_argument("--generator")
    p.add_argument("--data", help="data folder for the trained demo's test voxels")
    p.add_argument("--subject", type=int, default=1)
    p.add_argument("--batch", type=int, default=16, help="batched-throughput batch for the demo preset")
    p.add_argument("--paper-batch", type=int, default=4,
                   help="batched-throughput batch for the paper preset (it amortises reading the 4.6 GB of "
                        "weights at the coarse scales; on 2 CPU cores batch 1 is as fast per image, "
                        "see bench/RESULTS.md)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median)")
    p.add_argument("--paper-repeats", type=int, default=1)
    p.add_argument("--matmul-n", type=int, default=2048, help="size of the peak-measuring matmul")
    p.add_argument("--skip-demo", action="store_true"), p.add_argument("--skip-paper", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write all figures to this file")
    p.add_argument("--write-results", metavar="DIR", default=None,
                   help="write DIR/NAME.json (all figures) and DIR/NAME.md (the printed table); "
                        "bench/results is where committed results live")
    p.add_argument("--results-name", default=None, help="NAME of those files (default: DEVICE_DATE_TIME)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    peak_fp32 = matmul_peak(torch.float32, args.matmul_n, device)
    peak_bf16 = matmul_peak(torch.bfloat16, args.matmul_n, device)
    print(f"matmul peak ({args.matmul_n}³): fp32 {peak_fp32 / 1e9:.1f} GFLOP/s, bf16 {peak_bf16 / 1e9:.1f} GFLOP/s")
    results = {"environment": environment(args, argv, device), "peak_fp32": peak_fp32, "peak_bf16": peak_bf16,
               "runs": []}

    def bf16():
        return torch.autocast(device.type, dtype=torch.bfloat16)

    stacks = []
    if not args.skip_demo:
        stacks.append((demo_stack(args, device), args.repeats, bf16))
    if not args.skip_paper:
        stacks.append((paper_stack(args), args.paper_repeats, bf16))
    for (encoder, tokenizer, generator, voxels, name), repeats, autocast in stacks:
        encoder, tokenizer, generator = (m.to(device).eval() for m in (encoder, tokenizer, generator))
        generator = generator.to(torch.bfloat16)   # as `mindhier reconstruct` does where bf16 is fast
        print(f"\n== {name}: generator {generator.num_params() / 1e6:.1f} M params, scales {generator.cfg.scales}, "
              f"routing {generator.routing_table()}")
        warm_up(encoder, tokenizer, generator, voxels, device, autocast)
        K = generator.cfg.num_scales
        for batch in sorted({1, voxels.shape[0]}):
            for off in (None, K - 2):
                r = bench_config(name, encoder, tokenizer, generator, voxels[:batch], device, autocast, repeats, off)
                print_result(r, peak_bf16, peak_fp32)
                results["runs"].append(r)
        del encoder, tokenizer, generator
    print("\n" + results_markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)
    if args.write_results:
        name = args.results_name or f"{device.type}_{time.strftime('%Y-%m-%d_%H%M')}"
        for path in write_results(results, args.write_results, name):
            print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
