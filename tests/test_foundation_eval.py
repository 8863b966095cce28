"""`mindhier eval-foundation` on the tiny foundation release: the reader's table over the
tokenizer's reconstructions and the pretrained generator's drawings of the test stimuli."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from mindhier.cli import main
from mindhier.world.foundation_eval import ORACLE_ROW, TOKENIZER_ROW

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("foundation")
    assert main(["pretrain", "--recipe", "tiny", "--corpus", str(tmp / "corpus"), "--world", str(tmp / "world"),
                 "--out", str(tmp / "runs"), "--checkpoints", str(tmp / "released"), "--release"]) == 0
    return tmp


def test_eval_foundation_writes_the_table_the_grid_and_the_shares(released, capsys):
    out = released / "eval"
    assert main(["eval-foundation", "--world", str(released / "world"), "--foundation", str(released / "released"),
                 "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    rows = result["rates"]
    assert list(rows) == ["Stimuli themselves (reader ceiling)", TOKENIZER_ROW, ORACLE_ROW,
                          "Majority class (constant guess)"]
    assert result["images"] == 20 and all(r["n"] == 20 for row in rows.values() for r in row.values())
    stim = rows["Stimuli themselves (reader ceiling)"]
    for k, share in result["tokenizer_share_of_stimulus_rate"].items():
        assert math.isclose(share, rows[TOKENIZER_ROW][k]["rate"] / max(stim[k]["rate"], 1e-12))
    assert set(result["pixcorr"]) == {TOKENIZER_ROW, ORACLE_ROW}
    assert all(-1 <= v <= 1 for v in result["pixcorr"].values())
    assert out.with_suffix(".png").stat().st_size > 0 and "| tokenizer reconstruction |" in capsys.readouterr().out


def test_without_a_generator_only_the_tokenizer_row_is_drawn(released, tmp_path):
    folder = tmp_path / "partial"
    shutil.copytree(released / "released", folder)
    for f in folder.glob("generator*"):
        f.unlink()
    assert main(["eval-foundation", "--world", str(released / "world"), "--foundation", str(folder),
                 "--out", str(tmp_path / "eval.cfg1.5"), "--limit", "5"]) == 0   # a dot in OUT is kept
    result = json.loads((tmp_path / "eval.cfg1.5.json").read_text())
    assert ORACLE_ROW not in result["rates"] and result["images"] == 5
