"""The stage-2 benchmark runs end to end (small: demo preset, random weights, no paper preset)
and reports what issue 6 asks for: both peaks, batch 1 and batched, CFG everywhere and off
for the last two scales, per-scale times and an analytic FLOP count."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_generator.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_generator", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_reports_every_setting(bench, tmp_path):
    results = bench.main(["--skip-paper", "--batch", "2", "--repeats", "1", "--matmul-n", "128",
                          "--device", "cpu", "--json", str(tmp_path / "bench.json")])
    assert results["peak_fp32"] > 0 and results["peak_bf16"] > 0
    runs = results["runs"]
    assert {(r["batch"], r["cfg_off_from"]) for r in runs} == {(1, None), (1, 4), (2, None), (2, 4)}
    for r in runs:
        assert len(r["seconds"]["scales"]) == 6 and all(t > 0 for t in r["seconds"]["scales"])
        assert r["generator_flops"] > 0 and r["generator_flop_per_s"] > 0
    full, off = (next(r for r in runs if r["batch"] == 2 and r["cfg_off_from"] == k) for k in (None, 4))
    assert off["generator_flops"] < full["generator_flops"]   # the last two scales run B rows, not 2B
    assert (tmp_path / "bench.json").is_file()
