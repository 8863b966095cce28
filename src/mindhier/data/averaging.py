"""How a test image's 3 repetitions are used: the averaging policy every result states (SPEC §1.1).

``voxels``   average the 3 repetitions' voxels, then run the encoder once (MindHier, MindEye1; the
             default, and what the paper's tables use)
``outputs``  run the encoder on each repetition and average its outputs (MindEye2)

Commands take ``--averaging voxels|outputs`` (:func:`add_argument`); the data layer calls the same
two policies ``TestSet(policy="average"|"repeats")``. Results record the short name (reconstruct's
settings.json, the training checkpoints); :func:`recorded` also reads the sentence older
reconstruct folders wrote, and :func:`common_policy` refuses one table over both policies.
"""

from __future__ import annotations

import argparse

from mindhier.errors import MindhierError

AVERAGING = ("voxels", "outputs")
DEFAULT = "voxels"
DESCRIPTIONS = {
    "voxels": "voxels of the 3 repetitions averaged before the encoder (MindHier, MindEye1)",
    "outputs": "encoder run on each of the 3 repetitions, its outputs averaged (MindEye2)",
}
TEST_SET_POLICY = {"voxels": "average", "outputs": "repeats"}  # mindhier.data.TestSet's names
LEGACY_TEXT = "voxels averaged over repetitions before the encoder"  # reconstruct's settings.json before the flag


class AveragingError(MindhierError, ValueError):
    """An unknown averaging policy, or results of two policies put into one table."""


def add_argument(p: argparse.ArgumentParser, used_for: str) -> None:
    """``--averaging`` for a command that runs the encoder on test images (``used_for`` says what for)."""
    p.add_argument("--averaging", default=DEFAULT, choices=AVERAGING,
                   help=f"how the 3 repetitions of each test image are used for {used_for}: 'voxels' = "
                        "average their voxels, then run the encoder once (MindHier and MindEye1; the paper's "
                        "tables); 'outputs' = run the encoder on each repetition and average its outputs "
                        "(MindEye2). Recorded with the results; compare numbers only within one policy")


def dataset_policy(averaging: str) -> str:
    """The ``TestSet(policy=...)`` of an ``--averaging`` value."""
    if averaging not in TEST_SET_POLICY:
        raise AveragingError(f"--averaging {averaging!r} unknown; choose one of {', '.join(AVERAGING)}")
    return TEST_SET_POLICY[averaging]


def recorded(value) -> str | None:
    """The policy a result records ("voxels"/"outputs"), reading older reconstruct folders'
    sentence as "voxels"; None when nothing is recorded."""
    if value is None:
        return None
    if value in AVERAGING:
        return value
    if isinstance(value, str) and value.startswith(LEGACY_TEXT):
        return "voxels"
    raise AveragingError(f"averaging {value!r} is not a policy this toolkit writes ({', '.join(AVERAGING)})")


def common_policy(policies: dict[str, str | None], what: str) -> str | None:
    """The one policy of several results (name -> policy; None = not recorded); refuses a mix,
    naming which result used which: averages over subjects must compare like with like."""
    known = {name: p for name, p in policies.items() if p is not None}
    if len(set(known.values())) > 1:
        listed = "; ".join(f"{name}: {p}" for name, p in known.items())
        raise AveragingError(f"{what} mix the two averaging policies ({listed}); one table compares one policy: "
                             "reconstruct them all with the same --averaging (the paper's is voxels)")
    return next(iter(known.values()), None)


def describe(averaging: str) -> str:
    """'outputs: encoder run on each of the 3 repetitions, …' — what a table's setting row says."""
    return f"{averaging}: {DESCRIPTIONS[averaging]}"
