"""Where every file lives in the MindEye2 layout of NSD (SPEC §1.1), plus the synthetic
world's extras. This module is the single source of file names: readers, the world writer
and `prepare-nsd` all take paths from here, so the names cannot drift apart.

Layout under a data root::

    betas_all_subj01_fp32_renorm.hdf5      dataset "betas": (trials, voxels) float32
    wds/subj01/train/0.tar … {S-1}.tar     one tar per training session
    wds/subj01/new_test/0.tar              all shared1000 (test) trials
    coco_images_224_float16.hdf5           dataset "images": (N, 3, H, W) float16 in [0, 1]
    images/image_000123.png                (alternative to the HDF5 images)
    nsd_stimuli.hdf5                       dataset "imgBrick": (N, H, W, 3) uint8 (NSD's own stimulus
                                           file; also the pretraining corpus's image file)
    COCO_73k_annots_curated.npy            (N, 5) captions
    # synthetic world only:
    world/subj01_roi.npy                   per-voxel ROI label (0 early, 1 mid, 2 high)
    world/image_params.json                each image's generating parameters
    world/world.json                       the world's config, seed and summary
    # pretraining corpus only (no fMRI; images in nsd_stimuli.hdf5):
    corpus/labels.npz                      scene labels of every image (the world reader's)
    corpus/corpus.json                     the corpus's config, seed and digest
"""

from __future__ import annotations

from pathlib import Path

# behav.npy columns (MindEye2 webdataset; 17 columns, -1 means NaN)
BEHAV_COLUMNS = 17
COL_IMAGE = 0  # COCO-73k image index, 0-based
COL_SUBJECT = 1  # subject number (NSD responses-table order)
COL_SESSION = 2  # session, 1-based
COL_RUN = 3  # run within the session, 1-based
COL_TRIAL_IN_RUN = 4  # trial within the run, 1-based
COL_IS_OLD = 7  # 1 when the image was shown before (a repetition)
COL_TRIALS_SINCE_LAST = 11  # trials since the previous showing of this image
COL_TRIALS_SINCE_FIRST = 12  # trials since the first showing of this image
COL_REPETITION = 14  # 0 for the first showing, 1, 2 for repetitions
COL_TRIAL = 5  # global trial = row in the betas file
COL_SHARED = 16  # 1 when the image is one of the shared1000 (test) images

BETAS_DATASET = "betas"
IMAGES_DATASET = "images"
NSD_STIMULI_DATASET = "imgBrick"  # NSD's nsd_stimuli.hdf5: (73000, 425, 425, 3) uint8
TRIALS_PER_SESSION = 750  # NSD: row = (session - 1) * 750 + trial

# NSD voxel counts in nsdgeneral (SPEC §1.1), used to sanity-check real data.
NSD_VOXELS = {1: 15724, 2: 14278, 3: 15226, 4: 13153, 5: 13039, 6: 17907, 7: 12682, 8: 14386}
NSD_SESSIONS = {1: 40, 2: 40, 3: 32, 4: 30, 5: 40, 6: 32, 7: 40, 8: 30}
PAPER_SUBJECTS = (1, 2, 5, 7)

ROI_NAMES = ("early", "mid", "high")


def subj_name(subject: int) -> str:
    return f"subj{subject:02d}"


def betas_path(root: str | Path, subject: int) -> Path:
    return Path(root) / f"betas_all_{subj_name(subject)}_fp32_renorm.hdf5"


def wds_dir(root: str | Path, subject: int) -> Path:
    return Path(root) / "wds" / subj_name(subject)


def train_tar_path(root: str | Path, subject: int, session_index: int) -> Path:
    """Tar of training session ``session_index`` (0-based, as MindEye2 names them)."""
    return wds_dir(root, subject) / "train" / f"{session_index}.tar"


def test_tar_path(root: str | Path, subject: int) -> Path:
    return wds_dir(root, subject) / "new_test" / "0.tar"


def images_hdf5_path(root: str | Path) -> Path:
    return Path(root) / "coco_images_224_float16.hdf5"


def stimuli_hdf5_path(root: str | Path) -> Path:
    return Path(root) / "nsd_stimuli.hdf5"


def images_dir(root: str | Path) -> Path:
    return Path(root) / "images"


def image_png_path(root: str | Path, index: int) -> Path:
    return images_dir(root) / f"image_{index:06d}.png"


def captions_path(root: str | Path) -> Path:
    return Path(root) / "COCO_73k_annots_curated.npy"


def world_dir(root: str | Path) -> Path:
    return Path(root) / "world"


def roi_path(root: str | Path, subject: int) -> Path:
    return world_dir(root) / f"{subj_name(subject)}_roi.npy"


def image_params_path(root: str | Path) -> Path:
    return world_dir(root) / "image_params.json"


def world_info_path(root: str | Path) -> Path:
    return world_dir(root) / "world.json"


def subjects_in(root: str | Path) -> list[int]:
    """Subjects that have a betas file under ``root``, ascending."""
    found = []
    for p in Path(root).glob("betas_all_subj*_fp32_renorm.hdf5"):
        digits = p.name[len("betas_all_subj"):].split("_")[0]
        if digits.isdigit():
            found.append(int(digits))
    return sorted(found)


def corpus_info_path(root: str | Path) -> Path:
    return Path(root) / "corpus" / "corpus.json"


def corpus_labels_path(root: str | Path) -> Path:
    return Path(root) / "corpus" / "labels.npz"
