"""The stage-2 benchmark runs end to end (small: demo preset, random weights, no paper preset),
reports what issue 6 asks for (both peaks, batch 1 and batched, CFG everywhere and off for the
last two scales, per-scale times), writes its results as files, and its analytic FLOP count —
the numerator of every "% of peak" — agrees with torch's own count."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mindhier.generator import PRESETS, ScaleAwareGenerator

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_generator.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_generator", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_reports_every_setting_and_writes_its_results(bench, tmp_path):
    results = bench.main(["--skip-paper", "--batch", "2", "--repeats", "1", "--matmul-n", "128",
                          "--device", "cpu", "--write-results", str(tmp_path), "--results-name", "smoke"])
    assert results["peak_fp32"] > 0 and results["peak_bf16"] > 0
    runs = results["runs"]
    assert {(r["batch"], r["cfg_off_from"]) for r in runs} == {(1, None), (1, 4), (2, None), (2, 4)}
    for r in runs:
        assert len(r["seconds"]["scales"]) == 6 and all(t > 0 for t in r["seconds"]["scales"])
        assert r["generator_flops"] > 0 and r["generator_flop_per_s"] > 0
    full, off = (next(r for r in runs if r["batch"] == 2 and r["cfg_off_from"] == k) for k in (None, 4))
    assert off["generator_flops"] < full["generator_flops"]   # the last two scales run B rows, not 2B

    written = json.loads((tmp_path / "smoke.json").read_text())
    assert written == json.loads(json.dumps(results, default=float))
    assert written["environment"]["command"].endswith("--results-name smoke")
    table = (tmp_path / "smoke.md").read_text()
    assert table == bench.results_markdown(results)
    rows = [line for line in table.splitlines() if line.startswith("| demo")]
    assert len(rows) == 2 * len(runs)   # the main table and the per-scale table
    for r, row in zip(runs, rows):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:4] == [str(r["batch"]), bench.cfg_label(r), f"{r['seconds_per_image']:.3f}"]
        assert float(cells[-1]) == pytest.approx(100 * r["generator_flop_per_s"] / results["peak_bf16"], abs=0.05)


@pytest.mark.parametrize("routing", ["scale-aware", "none"])
@pytest.mark.parametrize("rows", [1, 4])
def test_analytic_flops_equal_flop_counter_mode(bench, routing, rows):
    """Per scale and for the once-per-image cache, on the tiny preset, exactly (FLOPs of matrix
    products are integers; element-wise work — norms, softmax, RoPE, SiLU — is counted by
    neither). PyTorch's CPU flash-attention kernel is not in FlopCounterMode's registry, so
    attention runs on the math backend, where scores and weighted values are visible bmm's."""
    cfg = dataclasses.replace(PRESETS["tiny"], routing=routing)
    torch.manual_seed(0)
    generator = ScaleAwareGenerator(cfg).eval()
    cond = generator.condition([torch.randn(rows, cfg.tokens_per_level, cfg.context_dim)
                                for _ in range(cfg.num_levels)])

    def counted(fn):
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            out = fn()
        return out, counter.get_total_flops()

    cache, flops = counted(lambda: generator.cross_attn_cache(cond))
    assert flops == bench.cache_flops(cfg, rows)
    for si, pn in enumerate(cfg.scales):
        x = None if si == 0 else torch.randn(rows, pn * pn, cfg.z_channels)
        _, flops = counted(lambda: generator.forward_scale(si, x, cond, cache))
        assert flops == bench.scale_flops(cfg, si, rows), f"scale {si + 1} ({pn}x{pn})"
