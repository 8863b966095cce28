"""Convert raw NSD to the MindEye2 layout that mindhier reads (SPEC §1.2 → §1.1).

Reads, relative to --nsd-root (NSD's own names, so every file is recognisable):
  nsddata_betas/ppdata/subjXX/func1pt8mm/{version}/betas_sessionNN.nii.gz   X×Y×Z×750 int16
  nsddata/ppdata/subjXX/func1pt8mm/roi/nsdgeneral.nii.gz                   voxels with value ≥ 1 kept
  nsddata/experiments/nsd/nsd_expdesign.mat                                 masterordering, subjectim
  nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5                              imgBrick (73000,425,425,3)
Writes under --out:
  betas_all_subjXX_fp32_renorm.hdf5     betas ÷ 300 (percent signal change), masked, z-scored per
                                        voxel and session with statistics of the NON-shared1000
                                        trials only (the test trials must not leak into them)
  wds/subjXX/train/{session-1}.tar      non-shared1000 trials of each session
  wds/subjXX/new_test/0.tar             all shared1000 trials (3 per image in full NSD)
  coco_images_224_float16.hdf5          (73000, 3, 224, 224) float16 in [0, 1], bicubic resize
                                        (what stage 1 needs: the vision model works at 224 px)
  nsd_stimuli.hdf5                      NSD's own 425-px imgBrick, linked (default) or copied: stage 2
                                        trains the generator on it (512-px crops in the paper, appendix
                                        E), not on the 224-px file upsampled (mindhier.data.stimuli)
Works one session at a time (one volume file ≈ 1 GB in memory). Outputs are written to
*.partial files and renamed when complete; nothing existing is replaced without --force.
Captions are not part of NSD: MindEye2 curated them from the COCO annotations
(COCO_73k_annots_curated.npy, shipped with MindEye2's preprocessed NSD); copy that file in.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from mindhier.data import layout
from mindhier.data.readers import DataError

DEFAULT_VERSION = "betas_fithrf_GLMdenoise_RR"
BETAS_SCALE = 300.0  # NSD volume betas are int16 = percent signal change × 300
SHARED_IMAGES = 1000  # masterordering ≤ 1000 points at one of the shared1000 images
IMAGE_SIZE = 224
FULL_STIMULI = ("link", "copy", "none")  # how nsd_stimuli.hdf5 reaches --out (it is ~40 GB)
CAPTIONS_NOTE = (
    "captions: NSD has none. MindEye2 curated them from the COCO annotations as "
    f"{layout.captions_path('.').name} (73000 × 5 strings, part of MindEye2's preprocessed NSD); "
    "copy that file into the output folder — mindhier does not make captions up."
)


# ----------------------------------------------------------------------------- NSD's names


def nsd_betas_path(nsd_root, subject: int, session: int, version: str = DEFAULT_VERSION) -> Path:
    return (Path(nsd_root) / "nsddata_betas/ppdata" / layout.subj_name(subject) / "func1pt8mm" / version
            / f"betas_session{session:02d}.nii.gz")


def nsd_mask_path(nsd_root, subject: int) -> Path:
    return Path(nsd_root) / "nsddata/ppdata" / layout.subj_name(subject) / "func1pt8mm/roi/nsdgeneral.nii.gz"


def nsd_expdesign_path(nsd_root) -> Path:
    return Path(nsd_root) / "nsddata/experiments/nsd/nsd_expdesign.mat"


def nsd_stimuli_path(nsd_root) -> Path:
    return Path(nsd_root) / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: {what} not found; check --nsd-root (it must hold NSD's own folder tree).")
    return path


# ----------------------------------------------------------------------------- design


@dataclass(frozen=True)
class Design:
    """NSD's experimental design, converted to 0-based indices."""

    masterordering: np.ndarray  # (30000,) trial -> index into subjectim columns
    subjectim: np.ndarray  # (8, 10000) -> COCO-73k index

    def session_trials(self, subject: int, session: int, trials_per_session: int = layout.TRIALS_PER_SESSION):
        """(coco indices, is_shared1000) of the trials of a 1-based session."""
        order = self.masterordering[(session - 1) * trials_per_session: session * trials_per_session]
        if len(order) < trials_per_session:
            raise DataError(f"nsd_expdesign.mat: masterordering has {len(self.masterordering)} trials, too few "
                            f"for session {session}; use --sessions to prepare fewer sessions.")
        return self.subjectim[subject - 1, order], order < SHARED_IMAGES


def load_design(path: Path) -> Design:
    import scipy.io

    mat = scipy.io.loadmat(_require(path, "NSD experimental design"))
    for key in ("masterordering", "subjectim"):
        if key not in mat:
            raise DataError(f"{path}: no variable {key!r} (found {sorted(k for k in mat if not k.startswith('__'))}); "
                            "this is not nsd_expdesign.mat.")
    order = np.asarray(mat["masterordering"]).reshape(-1).astype(np.int64) - 1
    subjectim = np.asarray(mat["subjectim"]).astype(np.int64) - 1
    if subjectim.ndim != 2 or order.min() < 0 or order.max() >= subjectim.shape[1] or subjectim.min() < 0:
        raise DataError(f"{path}: masterordering/subjectim are not 1-based indices of shapes (1, 30000)/(8, 10000) "
                        f"(got {mat['masterordering'].shape}/{subjectim.shape}); the file is damaged.")
    return Design(order, subjectim)


# ----------------------------------------------------------------------------- betas


def load_mask(path: Path) -> np.ndarray:
    import nibabel as nib

    mask = np.asarray(nib.load(_require(path, "nsdgeneral mask")).dataobj)
    return mask >= 1  # nsdgeneral: 1 inside, 0 outside, -1 outside the brain


def load_session_betas(path: Path, mask: np.ndarray, trials_per_session: int) -> np.ndarray:
    """(trials, voxels) float32 percent signal change of one session inside ``mask``."""
    import nibabel as nib

    img = nib.load(_require(path, "betas"))
    if img.shape[:3] != mask.shape or len(img.shape) != 4 or img.shape[3] != trials_per_session:
        raise DataError(f"{path}: volume shape {img.shape} does not fit the nsdgeneral mask {mask.shape} × "
                        f"{trials_per_session} trials; mask and betas must both be func1pt8mm of the same subject.")
    # Raw stored integers, whatever scl_slope says: NSD's convention is ÷300, applied explicitly.
    raw = img.dataobj.get_unscaled() if hasattr(img.dataobj, "get_unscaled") else np.asarray(img.dataobj)
    if not np.issubdtype(raw.dtype, np.integer):
        raise DataError(f"{path}: betas are {raw.dtype}, but NSD publishes int16 (percent signal change × 300); "
                        "use the original NSD files.")
    return (raw[mask].T.astype(np.float32)) / np.float32(BETAS_SCALE)


def zscore_session(betas: np.ndarray, shared: np.ndarray) -> tuple[np.ndarray, int]:
    """Z-score each voxel with mean/std (ddof 0) of the non-shared1000 trials only, so the test
    trials do not shape their own normalisation. Constant voxels become 0. Returns (z, n_constant)."""
    if shared.all():
        raise DataError("a session has only shared1000 trials: z-scoring statistics need training trials.")
    train = betas[~shared].astype(np.float64)
    mean, std = train.mean(axis=0), train.std(axis=0)
    constant = std == 0
    z = (betas - mean) / np.where(constant, 1.0, std)
    z[:, constant] = 0.0
    return z.astype(np.float32), int(constant.sum())


# ----------------------------------------------------------------------------- tars




def behav_rows(coco: np.ndarray, trials: np.ndarray, shared: np.ndarray, subject: int, session: int) -> np.ndarray:
    """(n, 17) behav rows: image, trial, shared1000, subject and 1-based session. The other
    columns come from NSD's behavioural responses, which preparation does not read: −1 (NaN)."""
    rows = -np.ones((len(trials), layout.BEHAV_COLUMNS))
    rows[:, layout.COL_IMAGE], rows[:, layout.COL_TRIAL], rows[:, layout.COL_SHARED] = coco, trials, shared
    rows[:, layout.COL_SUBJECT], rows[:, layout.COL_SESSION] = subject, session
    return rows


def write_behav_tar(path: Path, rows: np.ndarray) -> None:
    """MindEye2 webdataset tar: per trial ``sample{trial:09d}.{behav,past_behav,future_behav,
    olds_behav}.npy``; the last three are −1 placeholders (mindhier reads behav only)."""
    placeholder = _npy(-np.ones((1, layout.BEHAV_COLUMNS)))
    with tarfile.open(path, "w") as tar:
        for row in rows:
            key = f"sample{int(row[layout.COL_TRIAL]):09d}"
            for suffix, data in (("behav", _npy(row[None])), ("past_behav", placeholder),
                                 ("future_behav", placeholder), ("olds_behav", placeholder)):
                info = tarfile.TarInfo(f"{key}.{suffix}.npy")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


# ----------------------------------------------------------------------------- one subject


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def prepare_subject(nsd_root: Path, out: Path, subject: int, design: Design, sessions: int, version: str,
                    trials_per_session: int = layout.TRIALS_PER_SESSION, show_progress: bool = True) -> dict:
    """Write one subject's betas file and tars. Everything goes to a staging folder/partial
    file first and is moved into place only when the subject is complete."""
    mask = load_mask(nsd_mask_path(nsd_root, subject))
    betas_out = layout.betas_path(out, subject)
    staging = out / "wds" / f".{layout.subj_name(subject)}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "train").mkdir(parents=True)
    (staging / "new_test").mkdir()
    try:
        summary = _write_subject(nsd_root, staging, _partial(betas_out), subject, design, sessions, version, mask,
                                 trials_per_session, show_progress)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # leave no half-written output behind
        _partial(betas_out).unlink(missing_ok=True)
        raise
    final_dir = layout.wds_dir(out, subject)
    shutil.rmtree(final_dir, ignore_errors=True)  # only reached with --force or when absent
    os.replace(staging, final_dir)
    os.replace(_partial(betas_out), betas_out)
    return summary


def _write_subject(nsd_root: Path, staging: Path, betas_partial: Path, subject: int, design: Design, sessions: int,
                   version: str, mask: np.ndarray, trials_per_session: int, show_progress: bool) -> dict:
    voxels = int(mask.sum())
    test_rows, constant = [], 0
    with h5py.File(betas_partial, "w") as f:
        ds = f.create_dataset(layout.BETAS_DATASET, shape=(sessions * trials_per_session, voxels), dtype="f4",
                              chunks=(min(64, trials_per_session), voxels))
        for session in tqdm(range(1, sessions + 1), desc=f"{layout.subj_name(subject)} sessions", disable=not show_progress):
            coco, shared = design.session_trials(subject, session, trials_per_session)
            betas = load_session_betas(nsd_betas_path(nsd_root, subject, session, version), mask, trials_per_session)
            z, n_const = zscore_session(betas, shared)
            constant = max(constant, n_const)
            first = (session - 1) * trials_per_session
            ds[first:first + trials_per_session] = z
            rows = behav_rows(coco, first + np.arange(trials_per_session), shared, subject, session)
            write_behav_tar(staging / "train" / f"{session - 1}.tar", rows[~shared])
            test_rows.append(rows[shared])
    write_behav_tar(staging / "new_test" / "0.tar", np.concatenate(test_rows))
    n_test = sum(len(r) for r in test_rows)
    return {"subject": subject, "voxels": voxels, "sessions": sessions, "train_trials": sessions * trials_per_session - n_test,
            "test_trials": n_test, "constant_voxels": constant}


# ----------------------------------------------------------------------------- images


def _brick(src: h5py.File, stimuli: Path) -> h5py.Dataset:
    if "imgBrick" not in src:
        raise DataError(f"{stimuli}: no dataset 'imgBrick' (found {sorted(src.keys())}); this is not nsd_stimuli.hdf5.")
    brick = src["imgBrick"]
    if brick.ndim != 4 or brick.shape[-1] != 3 or brick.dtype != np.uint8:
        raise DataError(f"{stimuli}: imgBrick is {brick.shape} {brick.dtype}; expected (N, H, W, 3) uint8.")
    return brick


def prepare_images(stimuli: Path, out_path: Path, chunk: int = 64, show_progress: bool = True) -> int:
    """imgBrick (N, 425, 425, 3) uint8 → (N, 3, 224, 224) float16 in [0, 1] (PIL bicubic)."""
    with h5py.File(_require(stimuli, "NSD stimuli"), "r") as src:
        brick = _brick(src, stimuli)
        n = brick.shape[0]
        try:
            _resize_brick(brick, _partial(out_path), chunk, show_progress)
        except BaseException:
            _partial(out_path).unlink(missing_ok=True)
            raise
    os.replace(_partial(out_path), out_path)
    return n


def _resize_brick(brick: h5py.Dataset, dest: Path, chunk: int, show_progress: bool) -> None:
    from PIL import Image

    n = brick.shape[0]
    with h5py.File(dest, "w") as dst:
        ds = dst.create_dataset(layout.IMAGES_DATASET, shape=(n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype="f2",
                                chunks=(1, 3, IMAGE_SIZE, IMAGE_SIZE))
        for start in tqdm(range(0, n, chunk), desc="images", unit="chunk", disable=not show_progress):
            block = brick[start:start + chunk]
            resized = np.stack([np.asarray(Image.fromarray(im).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC))
                                for im in block])
            ds[start:start + len(block)] = (resized.transpose(0, 3, 1, 2) / 255.0).astype(np.float16)


def place_full_stimuli(stimuli: Path, out_path: Path, how: str) -> None:
    """NSD's own full-size stimuli under --out for stage 2: a symbolic link (default: the file is
    ~40 GB) or a copy. The link or copy is made beside and renamed into place when complete."""
    if how not in FULL_STIMULI:
        raise DataError(f"--full-stimuli {how!r}: choose one of {FULL_STIMULI}.")
    with h5py.File(_require(stimuli, "NSD stimuli"), "r") as src:
        _brick(src, stimuli)
    source_itself = out_path.exists() and not out_path.is_symlink() and out_path.resolve() == stimuli.resolve()
    if how == "none" or source_itself:  # --out is NSD's own stimuli folder: never replace the source
        return
    partial = _partial(out_path)
    partial.unlink(missing_ok=True)
    try:
        os.symlink(stimuli.resolve(), partial) if how == "link" else shutil.copyfile(stimuli, partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out_path)  # replaces a link itself, never the file it points to


# ----------------------------------------------------------------------------- whole run


def planned_outputs(out: Path, subjects, skip_images: bool, full_stimuli: str = "link") -> list[Path]:
    paths = [p for s in subjects for p in (layout.betas_path(out, s), layout.wds_dir(out, s))]
    paths += [] if skip_images else [layout.images_hdf5_path(out)]
    return paths + ([] if full_stimuli == "none" else [layout.stimuli_hdf5_path(out)])


def check_inputs(nsd_root: Path, subjects, sessions: dict[int, int], version: str, skip_images: bool,
                 full_stimuli: str = "link") -> None:
    """Fail before writing anything when an input is missing."""
    _require(nsd_expdesign_path(nsd_root), "NSD experimental design")
    if not skip_images or full_stimuli != "none":
        _require(nsd_stimuli_path(nsd_root), "NSD stimuli (or pass --skip-images --full-stimuli none)")
    for s in subjects:
        _require(nsd_mask_path(nsd_root, s), "nsdgeneral mask")
        for session in range(1, sessions[s] + 1):
            path = nsd_betas_path(nsd_root, s, session, version)
            if not path.is_file():
                raise DataError(f"{path}: betas not found (subject {s}, session {session} of {sessions[s]}); download it, "
                                "pass --sessions N to prepare only the first N sessions, or check --betas-version.")


def prepare_nsd(nsd_root, out, subjects=layout.PAPER_SUBJECTS, betas_version: str = DEFAULT_VERSION,
                sessions: int | None = None, force: bool = False, skip_images: bool = False,
                trials_per_session: int = layout.TRIALS_PER_SESSION, show_progress: bool = True,
                full_stimuli: str = "link") -> list[dict]:
    """Raw NSD → MindEye2 layout. ``sessions``: the first N sessions of every subject (default:
    all it completed). ``full_stimuli``: link (default), copy or leave out NSD's 425-px
    nsd_stimuli.hdf5 for stage 2. Returns one summary dict per subject."""
    nsd_root, out = Path(nsd_root), Path(out)
    subjects = [int(s) for s in subjects]
    unknown = [s for s in subjects if s not in layout.NSD_SESSIONS]
    if unknown:
        raise DataError(f"subject {unknown[0]} does not exist in NSD (subjects 1..8).")
    per_subject = {s: sessions or layout.NSD_SESSIONS[s] for s in subjects}
    too_many = [s for s in subjects if per_subject[s] > layout.NSD_SESSIONS[s]]
    if too_many:
        s = too_many[0]
        raise DataError(f"--sessions {per_subject[s]}: subject {s} completed only {layout.NSD_SESSIONS[s]} sessions.")
    existing = [p for p in planned_outputs(out, subjects, skip_images, full_stimuli) if p.exists() or p.is_symlink()]
    if existing and not force:
        raise DataError(f"{existing[0]} (and {len(existing) - 1} more outputs) already exist; nothing was changed — "
                        "pass --force to replace them, or choose another --out.")
    if full_stimuli not in FULL_STIMULI:
        raise DataError(f"--full-stimuli {full_stimuli!r}: choose one of {FULL_STIMULI}.")
    check_inputs(nsd_root, subjects, per_subject, betas_version, skip_images, full_stimuli)
    design = load_design(nsd_expdesign_path(nsd_root))
    out.mkdir(parents=True, exist_ok=True)
    summaries = [prepare_subject(nsd_root, out, s, design, per_subject[s], betas_version, trials_per_session, show_progress)
                 for s in subjects]
    if not skip_images:
        prepare_images(nsd_stimuli_path(nsd_root), layout.images_hdf5_path(out), show_progress=show_progress)
    place_full_stimuli(nsd_stimuli_path(nsd_root), layout.stimuli_hdf5_path(out), full_stimuli)
    return summaries


# ----------------------------------------------------------------------------- command


def add_arguments(parser) -> None:
    parser.add_argument("--nsd-root", required=True, type=Path, help="folder holding NSD's tree (nsddata/, nsddata_betas/, nsddata_stimuli/)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (MindEye2 layout)")
    parser.add_argument("--subjects", type=int, nargs="+", default=list(layout.PAPER_SUBJECTS),
                        help="NSD subjects (default: %(default)s, the paper's four)")
    parser.add_argument("--betas-version", default=DEFAULT_VERSION,
                        help="betas folder under func1pt8mm/ (default: %(default)s; betas_fithrf is the other common one)")
    parser.add_argument("--sessions", type=int, default=None,
                        help="prepare the first N sessions of each subject (default: all completed: 40 for s1/2/5/7)")
    parser.add_argument("--skip-images", action="store_true", help="do not convert nsd_stimuli.hdf5 (already done, or not needed)")
    parser.add_argument("--full-stimuli", default="link", choices=FULL_STIMULI,
                        help="put NSD's 425-px nsd_stimuli.hdf5 into --out for stage 2 (the generator trains on "
                             "it, not on the 224-px file): a symbolic link (default), a copy (~40 GB), or none")
    parser.add_argument("--force", action="store_true", help="replace existing outputs (default: refuse and change nothing)")


def run(args) -> int:
    summaries = prepare_nsd(args.nsd_root, args.out, args.subjects, args.betas_version, args.sessions,
                            args.force, args.skip_images, full_stimuli=args.full_stimuli)
    for s in summaries:
        note = ""
        if s["voxels"] != layout.NSD_VOXELS[s["subject"]]:
            note = f" (MindEye2's files have {layout.NSD_VOXELS[s['subject']]}: check the mask/--nsd-root)"
        print(f"subj{s['subject']:02d}: {s['voxels']} voxels{note}, {s['sessions']} sessions, "
              f"{s['train_trials']} train / {s['test_trials']} test trials"
              + (f", {s['constant_voxels']} constant voxels set to 0" if s["constant_voxels"] else ""))
    if args.full_stimuli != "none":
        print(f"stimuli for stage 2: {layout.stimuli_hdf5_path(args.out)} ({args.full_stimuli} of NSD's 425-px file)")
    print(CAPTIONS_NOTE)
    print(f"done: {args.out} — check it with `mindhier data-info {args.out}`")
    return 0
