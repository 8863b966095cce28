"""`--sessions` (mindhier.train.sessions) on the tiny world: NSD's numbering from 1, exactly the
trials of the chosen sessions' tars, sessions the data lacks refused, and what a checkpoint
records compared on resume and across the two stages."""

from __future__ import annotations

import numpy as np
import pytest

from mindhier.data import SubjectIndex, data_manifest, diff_manifests, layout, read_behav_tar
from mindhier.train import sessions
from mindhier.train.sessions import SessionError
from mindhier.world import PRESETS, generate_world

TRIALS_PER_SESSION = PRESETS["tiny"].trials_per_session


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(PRESETS["tiny"], tmp_path_factory.mktemp("sessions") / "world", show_progress=False)


def tar_rows(world, tar: int) -> np.ndarray:
    """Betas rows of subject 1's train/{tar}.tar, read straight from the tar."""
    return read_behav_tar(layout.train_tar_path(world, 1, tar))[:, layout.COL_TRIAL].astype(np.int64)


def test_session_lists_are_numbered_from_one():
    assert sessions.parse("1") == (1,) and sessions.parse("1-3,5") == (1, 2, 3, 5)
    assert sessions.parse(" 4, 2 ,2") == (2, 4) and sessions.parse(None) is None and sessions.parse("") is None
    for text, message in (("0", "numbered from 1"), ("0-2", "numbered from 1"), ("one", "session numbers and ranges"),
                          ("3-1", "names no session")):
        with pytest.raises(SessionError, match=message):
            sessions.parse(text)


def test_sessions_select_exactly_the_trials_of_their_tars(world):
    index = SubjectIndex(world, 1)
    assert sessions.available(index) == [1, 2, 3, 4, 5]
    picked = sessions.training_trials(world, 1, sessions.parse("1,3-4"), index)
    expected = np.sort(np.concatenate([tar_rows(world, tar) for tar in (0, 2, 3)]))
    assert np.array_equal(np.sort(picked.trials), expected) and sessions.trained_on(picked) == [1, 3, 4]
    # Session 1 is betas rows 0..149 less its test showings (those are in new_test, never trained on).
    one = sessions.training_trials(world, 1, (1,), index)
    test_rows = read_behav_tar(layout.test_tar_path(world, 1))[:, layout.COL_TRIAL]
    assert len(one) == TRIALS_PER_SESSION - int((test_rows < TRIALS_PER_SESSION).sum())
    assert (one.trials < TRIALS_PER_SESSION).all()
    assert len(sessions.training_trials(world, 1, None, index)) == len(index.train)


def test_sessions_the_data_lacks_are_refused_with_the_ones_it_has(world):
    index = SubjectIndex(world, 2)
    with pytest.raises(SessionError, match=r"subject 2 in .* has no session 6,9; it holds sessions 1-5"):
        sessions.training_trials(world, 2, (1, 6, 9), index)


def test_stage_two_must_use_the_encoders_sessions():
    sessions.check_same_sessions({"nsd_sessions": [1], "subject": 5}, [1], "enc")
    sessions.check_same_sessions({"subject": 5}, [1, 2], "enc")            # an encoder that records none
    with pytest.raises(SessionError, match="trained on sessions 1 of subject 5, this run would train on sessions "
                                           "1-2; .* pass --sessions 1, or train an encoder with --sessions 1-2"):
        sessions.check_same_sessions({"nsd_sessions": [1], "subject": 5}, [1, 2], "enc")
    with pytest.raises(SessionError, match="trained on sessions 1-3"):   # train-encoder's older 0-based record
        sessions.check_same_sessions({"sessions": [0, 1, 2], "subject": 5}, [1], "enc")


def test_older_checkpoints_sessions_are_read_as_train_tar_numbers():
    assert sessions.recorded({"sessions": [0, 2]}) == [1, 3] and sessions.recorded({"nsd_sessions": [2]}) == [2]
    assert sessions.recorded({}) is None
    assert sessions.legacy_settings({"sessions": [0, 2], "lr": 1}) == {"nsd_sessions": [1, 3], "lr": 1}
    assert sessions.legacy_settings({"sessions": None}) == {"nsd_sessions": None}
    assert sessions.legacy_settings({"nsd_sessions": [4]}) == {"nsd_sessions": [4]}


def test_the_data_manifest_records_and_compares_the_sessions(world):
    one, two, plain = (data_manifest(world, [1], sessions=s) for s in ([1], [2], None))
    assert one["sessions"] == [1] and "sessions" not in plain
    assert diff_manifests(one, two) == ["sessions differ: saved [1], now [2]"]
    assert diff_manifests(one, plain) == [] and diff_manifests(one, one) == []
