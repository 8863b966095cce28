"""Training on some of a subject's scan sessions (``--sessions``), e.g. the paper's one-session
setting (appendix C, Table S2).

Sessions are numbered as NSD numbers them, from 1: session s is the tar ``wds/subjXX/train/{s-1}.tar``
(MindEye2's layout holds one tar per session; ``mindhier.data`` counts the tars from 0). The
official code's ``--train_num_sessions N`` (stage 1) and ``num_sessions`` (stage 2) read tars
0..N−1, i.e. sessions 1..N. Test images are never in the training tars (they come from
``new_test/0.tar``, which holds the shared images of every session), so the held-out set is the
same whichever sessions a model trains on.

A run records the sessions it trained on (checkpoint ``nsd_sessions`` and ``train.nsd_sessions``,
its data manifest's ``sessions``); ``--resume`` refuses other ones, and stage 2 refuses an encoder
trained on other sessions than its own (:func:`check_same_sessions`).
"""

from __future__ import annotations

import argparse
import os

from mindhier.data import SubjectIndex, TrainTrials
from mindhier.errors import MindhierError


class SessionError(MindhierError, ValueError):
    """--sessions that cannot be read, that the data does not have, or that differ between stages."""


def add_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sessions", default=None, metavar="LIST",
                   help="train only on these scan sessions, numbered from 1 as NSD numbers them (session s = "
                        "wds/subjXX/train/{s-1}.tar): '1' = the paper's one-session setting (Table S2), '1-3,5' "
                        "= sessions 1, 2, 3 and 5; default: every session the data holds. The test images are "
                        "the same whatever you pick. Recorded in the checkpoint; stage 2 must use the encoder's")


def parse(text: str | None) -> tuple[int, ...] | None:
    """'1-3,5' -> (1, 2, 3, 5); None or '' -> None (every session)."""
    if not text:
        return None
    sessions: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            sessions.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise SessionError(f"--sessions {text!r}: use session numbers and ranges like '1', '1-3' or '1-3,5'") from None
    if not sessions:
        raise SessionError(f"--sessions {text!r} names no session (a range runs low to high, like '1-3')")
    if min(sessions) < 1:
        raise SessionError(f"--sessions {text!r}: sessions are numbered from 1, as NSD numbers them (session 1 "
                           "is train/0.tar); add 1 to a tar number")
    return tuple(sorted(sessions))


def available(index: SubjectIndex) -> list[int]:
    """The sessions (1-based) whose training tars the data holds."""
    return [tar + 1 for tar in index.sessions]


def training_trials(data, subject: int, sessions: tuple[int, ...] | None, index: SubjectIndex) -> TrainTrials:
    """The training trials of ``sessions`` (None: all), refusing sessions the data lacks."""
    have = available(index)
    if sessions is not None:
        missing = sorted(set(sessions) - set(have))
        if missing:
            raise SessionError(f"--sessions: subject {subject} in {data} has no session {_ranges(missing)}; it holds "
                               f"sessions {_ranges(have)} (train/0.tar … = session 1 …); pick among those")
    tars = None if sessions is None else [s - 1 for s in sessions]
    return TrainTrials(data, subject, sessions=tars, index=index)


def trained_on(trials: TrainTrials) -> list[int]:
    """The sessions (1-based) the trials come from: what a checkpoint records."""
    return sorted({int(tar) + 1 for tar in trials.table.session})


def recorded(meta: dict) -> list[int] | None:
    """The sessions (1-based) a checkpoint trained on: ``nsd_sessions``, or ``sessions`` as
    train-encoder wrote it before (the train tar numbers, from 0); None when not recorded."""
    if meta.get("nsd_sessions") is not None:
        return [int(s) for s in meta["nsd_sessions"]]
    if meta.get("sessions") is not None:
        return [int(s) + 1 for s in meta["sessions"]]
    return None


def legacy_settings(train: dict) -> dict:
    """A checkpoint's ``train`` settings with the 0-based ``sessions`` of older train-encoder
    runs read as ``nsd_sessions``, so --resume compares like with like."""
    if "sessions" not in train or "nsd_sessions" in train:
        return train
    train = dict(train)
    old = train.pop("sessions")
    train["nsd_sessions"] = None if old is None else [int(s) + 1 for s in old]
    return train


def check_same_sessions(encoder_meta: dict, sessions: list[int], where: str | os.PathLike) -> None:
    """Stage 2 trains on the sessions its frozen encoder trained on: an encoder that saw more
    would leak them into a "one session" result, one that saw others mixes two experiments."""
    theirs = recorded(encoder_meta)
    if theirs is None or theirs == list(sessions):
        return
    raise SessionError(f"the encoder {where} was trained on sessions {_ranges(theirs)} of subject "
                       f"{encoder_meta.get('subject')}, this run would train on sessions {_ranges(sessions)}; both "
                       f"stages must see the same sessions: pass --sessions {_ranges(theirs)}, or train an encoder "
                       f"with --sessions {_ranges(sessions)}")


def _ranges(sessions) -> str:
    """[1, 2, 3, 5] -> '1-3,5' (the --sessions syntax)."""
    out, run = [], []
    for s in sorted(sessions):
        if run and s != run[-1] + 1:
            out.append(run)
            run = []
        run.append(s)
    if run:
        out.append(run)
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in out)
