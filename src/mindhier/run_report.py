"""Write the demo's report (stimulus beside reconstruction, coarse-to-fine strips, the metric
table with its setting, one row per subject and their average) for any reconstructions that
`mindhier reconstruct` made and `mindhier evaluate` scored, e.g. real NSD results.

    mindhier report --recons subj01=runs/recon_s1 subj02=runs/recon_s2 --images /data/nsd_me2 \\
        --eval runs/eval --out runs/report

--recons names the `reconstruct --out` folders (recons.safetensors, settings.json,
coarse_to_fine/) under the names `evaluate --recons` gave them; --eval is the `evaluate --out`
folder (metrics.json). The report refuses inputs that do not belong together: a subject the
evaluation did not score (or scored from another file), other image counts, reconstructions of
images that are not the subject's test images, or another data folder than the one reconstructed
from. OUT gets report.html, report.md, report.json and the PNGs beside them.

From Python (the demo writes its report this way): :func:`read_recon_folder` reads a
reconstruct folder, :func:`write_reconstruction_report` lays the pictures out with any table.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

import numpy as np
import torch

from mindhier.errors import MindhierError

RECONSTRUCT = "`mindhier reconstruct --out DIR`"
EVALUATE = "`mindhier evaluate --recons NAME=DIR/recons.safetensors --images DATA_ROOT --out EVAL_DIR`"


class ReportError(MindhierError):
    """Report inputs that are missing or do not belong together."""


# ---------------------------------------------------------------------------------------------
# a reconstruct folder


@dataclass
class ReconFolder:
    """What `mindhier reconstruct` wrote into one folder (see its module doc)."""

    folder: Path
    sets: dict[str, torch.Tensor]   # label ("single-shot", "best-of-N") -> (N, 3, H, W) in [0, 1]
    image_index: np.ndarray         # ascending, one per image
    settings: dict                  # settings.json
    primary: str                    # the label of recons.safetensors

    @property
    def recons(self) -> torch.Tensor:
        return self.sets[self.primary]

    def strips(self, count: int, prefix: str = "") -> list[tuple[str, np.ndarray]]:
        """The first ``count`` coarse-to-fine rows (the picture after each scale)."""
        from mindhier.report import read_grid_row

        pngs = sorted((self.folder / "coarse_to_fine").glob("*.png"))[:count]
        return [(f"{prefix}image {png.stem}", read_grid_row(png)) for png in pngs]


def read_recon_folder(folder: str | Path) -> ReconFolder:
    """Read a reconstruct output folder, refusing one that is incomplete or mixes two runs."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"{folder}: no such folder; give the folder {RECONSTRUCT} wrote")
    settings_path = folder / "settings.json"
    if not settings_path.is_file():
        raise ReportError(f"{settings_path}: not found; {folder} is not a complete reconstruct output "
                          f"(run {RECONSTRUCT} again, with --force)")
    settings = json.loads(settings_path.read_text())
    primary = settings.get("primary", "single-shot")
    sets, index = {}, None
    for label in settings.get("labels", [primary]):
        path = folder / ("recons.safetensors" if label == primary else f"recons_{label}.safetensors")
        try:
            tensors = load_file(str(path))
        except (FileNotFoundError, SafetensorError) as err:
            raise ReportError(f"{path}: cannot be read ({err}); settings.json lists the {label} set: "
                              f"run {RECONSTRUCT} again, with --force") from None
        if "recons" not in tensors or "image_index" not in tensors:
            raise ReportError(f"{path}: holds {sorted(tensors)}, not 'recons' and 'image_index'; it was not "
                              f"written by {RECONSTRUCT}")
        sets[label] = tensors["recons"]
        mine = tensors["image_index"].numpy().astype(np.int64)
        if index is not None and not np.array_equal(mine, index):
            raise ReportError(f"{path}: other images than {folder / 'recons.safetensors'}; the folder mixes "
                              f"two runs: run {RECONSTRUCT} again, with --force")
        index = mine
    n = settings.get("n_images", len(index))
    if len(index) != n or any(len(s) != n for s in sets.values()):
        raise ReportError(f"{folder}: settings.json says {n} images, recons.safetensors holds {len(index)}; the "
                          f"folder mixes two runs: run {RECONSTRUCT} again, with --force")
    if len(index) == 0 or np.any(np.diff(index) <= 0):
        raise ReportError(f"{folder / 'recons.safetensors'}: image_index is empty or not ascending and unique, "
                          f"not as {RECONSTRUCT} writes it")
    return ReconFolder(folder, sets, index, settings, primary)


# ---------------------------------------------------------------------------------------------
# the report (shared with the demo)


def write_reconstruction_report(out: str | Path, *, runs: dict[str, ReconFolder], shown: dict[str, torch.Tensor],
                                stimuli: dict[str, torch.Tensor], n_images: int, n_strips: int,
                                **report) -> dict[str, Path]:
    """`mindhier.report.write_report` with the pictures taken from reconstruct folders.

    ``shown[name]``: the reconstructions of ``runs[name]`` drawn (the set that was scored);
    ``stimuli[name]``: its stimuli, in the order of its image_index. With several runs the grid
    shows, under each stimulus, every run's reconstruction of it (the images all runs share;
    the first run's alone when they share none). ``report``: write_report's other arguments."""
    from mindhier.report import write_report

    names = list(runs)
    common = reduce(np.intersect1d, [runs[n].image_index for n in names])[:n_images]
    if len(common) == 0:  # e.g. subjects with disjoint test images: show the first one's
        names, common = names[:1], runs[names[0]].image_index[:n_images]

    def pick(name: str, images: torch.Tensor) -> np.ndarray:
        return images[np.searchsorted(runs[name].image_index, common)].float().numpy()

    gt = pick(names[0], stimuli[names[0]])
    recon = pick(names[0], shown[names[0]]) if len(runs) == 1 else [(n, pick(n, shown[n])) for n in names]
    strips = [s for n in runs for s in runs[n].strips(n_strips, prefix="" if len(runs) == 1 else f"{n}, ")]
    return write_report(out, gt=gt, recon=recon, strips=strips, **report)


# ---------------------------------------------------------------------------------------------
# command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recons", nargs="+", action="extend", required=True, metavar="NAME=DIR",
                   help="reconstruct output folders, under the names `mindhier evaluate --recons` gave them "
                        "(subj01=DIR subj02=DIR ...)")
    p.add_argument("--eval", required=True, metavar="EVAL_DIR", help="`mindhier evaluate --out` folder (metrics.json)")
    p.add_argument("--images", default=None, metavar="DATA_ROOT",
                   help="the stimuli: the data folder (MindEye2 layout) or tensor file the evaluation scored "
                        "against (default: the one metrics.json records)")
    p.add_argument("--out", required=True, help="output folder for report.html, report.md, report.json and PNGs")
    p.add_argument("--show", type=int, default=24, help="stimuli in the picture grid")
    p.add_argument("--strips", type=int, default=4, help="coarse-to-fine strips per subject")
    p.add_argument("--title", default=None, help="report title (default: names the subjects)")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT/report.html")


def run(args: argparse.Namespace) -> int:
    from mindhier.evaluate import parse_pairs

    out = Path(args.out)
    if (out / "report.html").exists() and not args.force:
        raise ReportError(f"{out / 'report.html'} exists; choose another --out or pass --force")
    result = read_metrics(Path(args.eval))
    folders = parse_pairs(args.recons, "--recons", allow_bare=True)
    check_names(folders, result, Path(args.eval) / "metrics.json")
    images = images_path(args.images, result, Path(args.eval) / "metrics.json")
    runs, labels, stimuli = {}, {}, {}
    for name, folder in folders.items():
        runs[name] = read_recon_folder(folder)
        labels[name] = scored_label(name, runs[name], result, Path(args.eval) / "metrics.json")
        stimuli[name] = ground_truth(name, runs[name], images)
    shown = {name: runs[name].sets[label] for name, label in labels.items()}
    rows, columns, settings, notes = report_table(result, runs, labels, images, Path(args.eval))
    title = args.title or f"mindhier reconstructions: {', '.join(folders)}"
    paths = write_reconstruction_report(
        out, runs=runs, shown=shown, stimuli=stimuli, n_images=args.show, n_strips=args.strips,
        title=title, intro=("Images reconstructed from fMRI by the MindHier pipeline (hierarchical fMRI encoder → "
                            "scale-aware coarse-to-fine generator → VQ-VAE decoder), scored by `mindhier evaluate`."),
        settings=settings, metric_rows=rows, columns=columns, notes=notes)
    print(f"report: {paths['html']} (also report.md, report.json)")
    return 0


def read_metrics(eval_dir: Path) -> dict:
    path = eval_dir / "metrics.json"
    if not path.is_file():
        raise ReportError(f"{path}: not found; score the reconstructions first: {EVALUATE}")
    result = json.loads(path.read_text())
    missing = [k for k in ("rows", "n_images", "columns", "setting", "recons") if k not in result]
    if missing:
        raise ReportError(f"{path}: no {', '.join(missing)}; not a `mindhier evaluate` output (run {EVALUATE})")
    return result


def check_names(folders: dict[str, str], result: dict, where: Path) -> None:
    scored = [n for n in result["rows"] if n != "average"]
    if sorted(folders) != sorted(scored):
        raise ReportError(f"{where} scores {', '.join(scored)}; --recons gives {', '.join(folders)}: give one "
                          "reconstruct folder per scored name (its table's average is over exactly those), or "
                          "evaluate these")


def images_path(given: str | None, result: dict, where: Path) -> Path:
    recorded = Path(result.get("images", ""))
    if given is None:
        if not recorded.exists():
            raise ReportError(f"{where} was scored against {recorded}, which is not here; give --images")
        return recorded
    if recorded.exists() and not _same(recorded, Path(given)):
        raise ReportError(f"{where} was scored against {recorded}, not --images {given}: give --images "
                          f"{recorded}, or evaluate against {given}")
    return Path(given)


def scored_label(name: str, run: ReconFolder, result: dict, where: Path) -> str:
    """Which set of the folder the evaluation scored (and the report must show)."""
    recorded = Path(result["recons"].get(name) or result["recons"].get("all", ""))
    files = {run.folder / "recons.safetensors": run.primary, run.folder / "images": run.primary}
    files.update({run.folder / f"recons_{label}.safetensors": label for label in run.sets if label != run.primary})
    label = next((lab for path, lab in files.items() if recorded.exists() and _same(recorded, path)), None)
    if label is None and recorded.exists():
        raise ReportError(f"{where} scored {name} from {recorded}, not from {run.folder}: give --recons "
                          f"{name}={recorded.parent}, or evaluate {run.folder / 'recons.safetensors'}")
    label = label or run.primary  # moved since it was scored: the counts below still have to agree
    n = result["n_images"].get(name)
    if n != len(run.image_index):
        raise ReportError(f"{where} scored {n} images for {name}; {run.folder} holds {len(run.image_index)}: "
                          f"they are not the same reconstructions (evaluate {run.folder / 'recons.safetensors'})")
    stated = re.search(r"best-of-\d+|single-shot", str(result["setting"].get("sampling", "")))
    if stated and stated.group(0) != label:
        raise ReportError(f"{where} states sampling={result['setting']['sampling']}, but it scored the {label} "
                          f"set of {run.folder}; re-run evaluate with the right --setting sampling=")
    return label


def ground_truth(name: str, run: ReconFolder, images: Path) -> torch.Tensor:
    """The stimuli of ``run``'s images, in its order, from a data folder or a tensor file."""
    from mindhier.data import ImageStore
    from mindhier.evaluate import is_data_root, load_ground_truth, subject_from_name, subject_test_images

    if not is_data_root(images):
        gts = load_ground_truth(images, None)
        if len(gts) != len(run.image_index):
            raise ReportError(f"{images}: {len(gts)} images, {run.folder} reconstructed {len(run.image_index)}")
        return gts.float()
    subject = _subject(name, run, subject_from_name(name))
    data = run.settings.get("data")
    if data and Path(data).exists() and not _same(Path(data), images):
        raise ReportError(f"{run.folder / 'settings.json'}: reconstructed from {data}, not --images {images}: "
                          "give the data folder the reconstructions came from")
    test = subject_test_images(images, subject)
    stray = np.setdiff1d(run.image_index, test)
    if len(stray):
        raise ReportError(f"{run.folder / 'recons.safetensors'}: images {stray[:5].tolist()} are not subject "
                          f"{subject}'s test images in {images}; these reconstructions belong to other data "
                          "or another subject")
    with ImageStore(images) as store:
        return torch.from_numpy(store.get(run.image_index))


def _subject(name: str, run: ReconFolder, from_name: int | None) -> int:
    recorded = run.settings.get("subject")
    if from_name is not None and recorded is not None and int(recorded) != from_name:
        raise ReportError(f"{run.folder / 'settings.json'}: reconstructed subject {recorded}, but --recons names "
                          f"it {name}")
    subject = from_name if from_name is not None else recorded
    if subject is None:
        raise ReportError(f"--recons {name}: name the subject (e.g. subj01=DIR)")
    return int(subject)


def report_table(result: dict, runs: dict[str, ReconFolder], labels: dict[str, str], images: Path, eval_dir: Path):
    """(metric rows, columns, setting, notes) of the report, from metrics.json and the runs."""
    from mindhier.evaluate import SETTING_KEYS, table_rows

    rows, columns = table_rows(result)
    # What the evaluation was not told, the reconstruct folders record.
    recorded = {"split": {r.settings.get("split") for r in runs.values()},
                "sampling": set(labels.values()), "subjects": {", ".join(runs)}}
    setting = {k: result["setting"].get(k) or (f"{', '.join(sorted(map(str, recorded[k])))} (settings.json)"
                                               if k in recorded else "not stated") for k in SETTING_KEYS}
    setting["averaging"] = averaging_setting(result, runs, eval_dir)
    setting.update({k: v for k, v in result["setting"].items() if k not in SETTING_KEYS})
    sampling = {json.dumps(r.settings.get("sampling", {})) for r in runs.values()}
    setting["sampling settings"] = sampling.pop() if len(sampling) == 1 else "differ per subject (see settings.json)"
    setting["checkpoints"] = "; ".join(
        f"{name}: " + ", ".join(f"{k} `{v}`" for k, v in r.settings.get("checkpoints", {}).items() if k != "generator_identity")
        for name, r in runs.items())
    setting["stimuli"] = f"`{images}`"
    setting["metrics"] = f"`{eval_dir / 'metrics.json'}` (commit {result.get('commit') or 'unknown'})"
    notes = list(dict.fromkeys(c["note"] for c in result["columns"] if c.get("note")))
    notes += [f"n/a {k}: {reason}" for k, reason in result.get("unavailable", {}).items()]
    notes.append("Rows in italics are published numbers, not this run.")
    return rows, columns, setting, notes


def averaging_setting(result: dict, runs: dict[str, ReconFolder], eval_dir: Path) -> str:
    """The table's averaging policy: the one every reconstruct folder records (a table over
    subjects reconstructed under both policies is refused), which the evaluation, when it states
    one, must agree with."""
    from mindhier.data import averaging

    policy = averaging.common_policy({n: averaging.recorded(r.settings.get("averaging")) for n, r in runs.items()},
                                     "the reconstruct folders of --recons")
    stated = result["setting"].get("averaging")
    if policy is None:
        return stated or "not stated"
    if stated is not None and stated != policy:
        raise ReportError(f"{eval_dir / 'metrics.json'} states averaging={stated}, but the reconstructions were made "
                          f"with averaging={policy} (settings.json): evaluate them again without --setting averaging "
                          "(it is read from settings.json)")
    return f"{averaging.describe(policy)} (settings.json)"


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False
