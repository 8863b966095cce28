"""bench/bench_foundation.py runs, counts FLOPs with FlopCounterMode and writes its JSON + table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_bench_foundation_smoke(tmp_path):
    import bench_foundation

    result = bench_foundation.main(["--only", "reader", "generator", "--steps", "1", "--batch", "4",
                                    "--peak-seconds", "0.3", "--out", str(tmp_path)])
    rows = {r["model"]: r for r in result["rows"]}
    # the reader's step on 4 images of 64 px, forward + backward (≈ 3x forward): about 0.3 GFLOP
    assert 5e7 < rows["reader"]["flops_per_step"] < 5e9
    assert 0 < rows["generator"]["share_of_peak"] < 1.5
    saved = json.loads((tmp_path / "bench_foundation.json").read_text())
    assert [r["model"] for r in saved["rows"]] == ["reader", "generator"]
    assert "share of peak" in (tmp_path / "bench_foundation.md").read_text()
