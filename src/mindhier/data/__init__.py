"""NSD data layer: readers and datasets over the MindEye2 layout (SPEC §1.1), the data
manifest saved in checkpoints, and raw-NSD preparation (SPEC §1.2).

File names live in :mod:`mindhier.data.layout`; import from here for everything else."""

from mindhier.data.datasets import (
    TEST_POLICIES, TEST_REPETITIONS, SubjectIndex, TestData, TestSet, TrainTrials, TrialTable, load_test_set,
)
from mindhier.data.manifest import data_manifest, diff_manifests
from mindhier.data.readers import BetasFile, DataError, ImageStore, caption_for, load_captions, read_behav_tar

__all__ = [
    "BetasFile", "DataError", "ImageStore", "SubjectIndex", "TEST_POLICIES", "TEST_REPETITIONS",
    "TestData", "TestSet", "TrainTrials", "TrialTable", "caption_for", "data_manifest", "diff_manifests",
    "load_captions", "load_test_set", "read_behav_tar",
]
