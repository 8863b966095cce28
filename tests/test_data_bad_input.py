"""Bad input the data layer must name clearly: unnormalised betas, behav rows past the end of
the betas file, NaN/inf that plain `data-info` must find. Built on test_data's small layout."""

from __future__ import annotations

import numpy as np
import pytest

from mindhier.cli import main as cli_main
from mindhier.data import DataError, SubjectIndex, TrainTrials, layout
from test_data import SUBJECT, TRAIN_ROWS, VOXELS, behav_row, make_layout, snapshot, write_tar


def data_info(capsys, root, *flags) -> tuple[int, str]:
    code = cli_main(["data-info", str(root), *flags])
    return code, capsys.readouterr().out


def gaussian(scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(0).standard_normal((40, VOXELS)) * scale).astype(np.float32)


# ----------------------------------------------------------------------------- betas scale


def test_raw_int16_betas_are_reported_and_refused_for_training(tmp_path, capsys):
    raw = np.round(gaussian(2.5 * 300)).astype(np.int16)  # NSD: percent signal change × 300, undivided
    make_layout(tmp_path, raw)
    path = str(layout.betas_path(tmp_path, SUBJECT))
    before = snapshot(tmp_path)
    code, text = data_info(capsys, tmp_path)
    assert code == 1 and "no problems found" not in text
    problem = next(line for line in text.splitlines() if "not z-scored" in line)
    assert path in problem and "int16" in problem and "× 300" in problem and "prepare-nsd" in problem
    assert "median per-voxel std over 40 rows is 7" in problem  # the scale seen (≈ 750)
    with pytest.raises(DataError, match="not z-scored.*whole number.*× 300") as err:
        TrainTrials(tmp_path, SUBJECT)
    assert path in str(err.value) and "prepare-nsd" in str(err.value)
    with pytest.raises(DataError, match="not z-scored"):
        TrainTrials(tmp_path, SUBJECT, in_memory=False)
    assert snapshot(tmp_path) == before


def test_betas_scaled_down_are_reported(tmp_path, capsys):
    make_layout(tmp_path, gaussian(1 / 300))
    code, text = data_info(capsys, tmp_path)
    assert code == 1 and "not z-scored" in text and "scaled down" in text
    with pytest.raises(DataError, match="not z-scored"):
        TrainTrials(tmp_path, SUBJECT)


@pytest.mark.parametrize("scale", [1.0, 2.5])  # z-scored; percent signal change (divided, not z-scored)
def test_plausible_betas_scales_pass(tmp_path, capsys, scale):
    make_layout(tmp_path, gaussian(scale))
    code, text = data_info(capsys, tmp_path)
    assert code == 0 and "no problems found" in text
    assert len(TrainTrials(tmp_path, SUBJECT)) == 30


# ----------------------------------------------------------------------------- behav rows past the end


def rewrite_train_tar(root, session: int, trial_of) -> None:
    rows = TRAIN_ROWS[session]
    write_tar(layout.train_tar_path(root, SUBJECT, session),
              {f"sample{r:09d}": behav_row(int(r) % 100, trial_of(r), 0) for r in rows})


@pytest.mark.parametrize("trial_of, expected", [
    # rows 35..49: 35..39 collide with the untouched test tar, 40..49 lie past the end
    (lambda r: int(r) + 15, "10 of 15 samples (the first is sample #5 in key order) refer to betas rows 40..49"),
    # every sample the same row past the end: they also collide with each other
    (lambda r: 40, "15 of 15 samples (the first is sample #0 in key order) refer to betas row 40,"),
], ids=["shifted", "one_row"])
def test_rows_past_the_end_name_the_tar_that_has_them(tmp_path, capsys, trial_of, expected):
    make_layout(tmp_path)
    rewrite_train_tar(tmp_path, 1, trial_of)
    bad_tar, betas = layout.train_tar_path(tmp_path, SUBJECT, 1), layout.betas_path(tmp_path, SUBJECT)
    before = snapshot(tmp_path)
    with pytest.raises(DataError) as err:
        SubjectIndex(tmp_path, SUBJECT)
    msg = str(err.value)
    assert msg.startswith(f"{bad_tar}: ")
    assert expected in msg and f"{betas} holds 40 rows" in msg
    assert "more than one sample" not in msg and str(layout.test_tar_path(tmp_path, SUBJECT)) not in msg
    code, text = data_info(capsys, tmp_path)
    assert code == 1 and f"{bad_tar}: " in text and "more than one sample" not in text
    assert snapshot(tmp_path) == before


def test_shared_rows_name_every_tar_that_holds_them(tmp_path):
    make_layout(tmp_path)
    rewrite_train_tar(tmp_path, 1, lambda r: int(r) + 15)  # rows 35..49; 35..39 are test rows
    with pytest.raises(DataError, match="trial row 35 appears in more than one sample") as err:
        SubjectIndex(tmp_path, SUBJECT, check_betas=False)  # no betas file to check the range against
    msg = str(err.value)
    assert str(layout.train_tar_path(tmp_path, SUBJECT, 1)) in msg and str(layout.test_tar_path(tmp_path, SUBJECT)) in msg
    assert str(layout.train_tar_path(tmp_path, SUBJECT, 0)) not in msg


# ----------------------------------------------------------------------------- NaN/inf without --full


def test_sample_rows_are_bounded_evenly_spaced_and_deterministic():
    from mindhier.data import values

    rows = values.sample_rows(30000)
    assert len(rows) == values.SAMPLE_ROWS and rows[0] == 0 and rows[-1] == 29999
    assert (np.diff(rows) > 0).all() and np.array_equal(rows, values.sample_rows(30000))
    assert np.array_equal(values.sample_rows(40), np.arange(40)) and len(values.sample_rows(0)) == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_data_info_checks_a_sample_for_nonfinite_by_default(tmp_path, capsys, bad):
    betas = gaussian()
    betas[39, 2] = bad  # the last row is always in the sample
    make_layout(tmp_path, betas)
    code, text = data_info(capsys, tmp_path)
    assert code == 1 and "row 39" in text and "NaN/inf" in text and str(layout.betas_path(tmp_path, SUBJECT)) in text


def test_data_info_says_it_sampled_and_full_checks_every_row(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("mindhier.data.values.SAMPLE_ROWS", 8)  # rows 0, 6, 11, 17, 22, 28, 33, 39 of 40
    betas = gaussian()
    betas[21, 2] = np.nan  # not among the 8 sampled rows
    make_layout(tmp_path, betas)
    code, text = data_info(capsys, tmp_path)
    assert code == 0 and "no NaN/inf in a sample of 8 of 40 rows" in text and "--full" in text
    code, text = data_info(capsys, tmp_path, "--full")
    assert code == 1 and "row 21" in text and "NaN/inf" in text
    betas[21, 2] = 0.0
    make_layout(tmp_path, betas)
    code, text = data_info(capsys, tmp_path, "--full")
    assert code == 0 and "no NaN/inf in all 40 rows" in text
