"""The demo's evaluation and report: MindHier's reconstructions between a ceiling and a floor.

Rows of the metric table (all on the same held-out test images, voxels averaged over the 3
repetitions):
- **MindHier, single-shot / best-of-N**: ``mindhier reconstruct``'s outputs.
- **Ceiling, true features**: the same generator conditioned on the frozen vision model's own
  features v_{g_m} of the stimulus instead of the encoder's e_m (how good stage 2 could be with a
  perfect stage 1).
- **Ceiling, tokenizer**: the VQ-VAE's reconstruction of the stimulus itself (no generator can
  beat what the decoder can draw).
- **Floor, ridge**: ridge regression from voxels straight to pixels (the linear baseline).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

METRIC_COLUMNS = [
    ("pixcorr", "PixCorr ↑", "float"),
    ("ssim", "SSIM ↑", "float"),
    ("clip_ours", "CLIP-ours 2-way ↑", "percent"),
    ("lite0_twoway", "EffLite0 2-way ↑", "percent"),
    ("lite0_dist", "EffLite0 dist ↓", "float"),
]

ATTRIBUTE_COLUMNS = [
    ("main_category", "main object's shape", "percent"),
    ("main_colour", "main object's colour", "percent"),
    ("background_kind", "background pattern", "percent"),
    ("background_colour", "background colour", "percent"),
    ("colours_both", "both colours", "percent"),
]
PROBE_TRAIN_IMAGES = 1000
ATTRIBUTE_INTRO = (
    "What a reconstruction shows, in the world's own terms: the share of test images whose attribute, "
    "read from the reconstruction by a linear probe, is the stimulus's true one. The probes (ridge on "
    "EfficientNet-Lite0 features, the small CLIP's embedding and 4×4 pixel block means) are fitted on "
    "training stimuli and their tokenizer reconstructions, never on test images "
    "(`mindhier.world.attributes`). The stimuli row is what a perfect reconstruction scores; the "
    "majority row what a constant guess scores."
)


def load_test_images(world: Path, subject: int, image_index: np.ndarray) -> torch.Tensor:
    from mindhier.data import ImageStore

    return torch.from_numpy(ImageStore(world).get(image_index))


@torch.no_grad()
def tokenizer_ceiling(tokenizer, images01: torch.Tensor, batch: int = 64) -> torch.Tensor:
    out = []
    for chunk in images01.split(batch):
        x = tokenizer.images01_to_input(chunk)
        out.append(tokenizer.output_to_images01(tokenizer.indices_to_img(tokenizer.img_to_indices(x))).float())
    return torch.cat(out)


@torch.no_grad()
def true_feature_ceiling(ck: dict, world: Path, subject: int, images01: torch.Tensor, image_index: np.ndarray,
                         settings_json: dict, device: torch.device, batch: int = 16) -> torch.Tensor:
    """Generator conditioned on the vision model's features of the stimulus (single-shot).

    The encoder is trained on l2-normalised targets (paper Eq. 1), so its e_m carry an arbitrary
    overall scale; each true level is rescaled to the encoder's mean norm for that level on the
    test set, so the generator sees inputs of the size it was trained on."""
    from mindhier.data import TestSet
    from mindhier.encoder import load_encoder
    from mindhier.reconstruct import encode_conditions, load_generator
    from mindhier.sampling import SamplingSettings, reconstruct
    from mindhier.tokenizer import load_tokenizer
    from mindhier.vision import load_vision

    generator, _ = load_generator(ck["generator"], device)
    tokenizer = load_tokenizer(ck["tokenizer"], device=device)
    test = TestSet(world, subject, policy="average")
    encoder, enc_meta = load_encoder(ck["encoder"], num_voxels=test.num_voxels, subject=subject, device=device)
    vision = load_vision(ck["vision"], device=device)
    layers = enc_meta["vision"]["layers"]
    voxels = torch.stack([test[i]["voxels"] for i in range(len(image_index))]).to(device)
    encoded = encoder(voxels)
    scale = [e.flatten(1).norm(dim=1).mean() for e in encoded.levels]
    s = settings_json.get("sampling", {})
    settings = SamplingSettings(cfg=s.get("cfg", 6.0), top_k=s.get("top_k", 400), top_p=s.get("top_p", 0.95),
                                seed=s.get("seed", 0), num_candidates=1)
    out = []
    for start in range(0, len(image_index), batch):
        sl = slice(start, start + batch)
        feats = vision.image_layer_features(images01[sl].to(device), layers)
        levels = [f.float() / f.flatten(1).norm(dim=1).view(-1, 1, 1) * sc for f, sc in zip(feats, scale)]
        _, null, _ = encode_conditions(encoder, generator, voxels[sl])
        rec = reconstruct(generator, tokenizer, generator.condition(levels), null, settings,
                          [int(i) for i in image_index[sl]])
        out.append(rec.single_shot.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def attribute_rates(world: Path, subject: int, rows: dict, gts: torch.Tensor, image_index: np.ndarray,
                    tokenizer, vision, device: torch.device) -> list[tuple[str, dict]]:
    """Per row, the share of test images whose probed attributes match the stimulus's.

    The probes are fitted on (at most) PROBE_TRAIN_IMAGES training stimuli and their tokenizer
    reconstructions: enough for stable probes, and it keeps the default demo within minutes."""
    from mindhier.data import ImageStore, SubjectIndex
    from mindhier.metrics.nets import Lite0Pooled, load_effnet_lite0
    from mindhier.world import attributes

    train_ids = np.unique(SubjectIndex(world, subject).train.image)
    train_ids = train_ids[np.linspace(0, len(train_ids) - 1, min(PROBE_TRAIN_IMAGES, len(train_ids))).astype(int)]
    train_images = torch.from_numpy(ImageStore(world).get(train_ids))
    lite0 = Lite0Pooled(load_effnet_lite0()).to(device)

    def features(images: torch.Tensor) -> np.ndarray:
        return attributes.probe_features(images, lambda x: vision.image_embedding(x.to(device)),
                                         lambda x: lite0(x.to(device)))

    decoded = tokenizer_ceiling(tokenizer, train_images.to(device)).cpu()
    train_labels = attributes.attribute_labels(world, train_ids)
    probes = attributes.AttributeProbes(
        np.concatenate([features(train_images), features(decoded)]),
        {k: np.concatenate([v, v]) for k, v in train_labels.items()}, attributes.attribute_classes(world))
    truth = attributes.attribute_labels(world, image_index)
    table = [("Stimuli themselves (probe ceiling)", attributes.shown_rates(probes, features(gts), truth))]
    table += [(name, attributes.shown_rates(probes, features(recons), truth)) for name, recons in rows.items()]
    table.append(("Majority class (constant guess)", attributes.majority_rates(train_labels, truth)))
    return table


READER_COLUMNS = [
    ("main_category", "main object: shape", "rate"),
    ("main_colour", "main object: colour", "rate"),
    ("main_cell", "main object: position (3×3)", "rate"),
    ("background_kind", "background: kind", "rate"),
    ("background_colour", "background: colour", "rate"),
    ("present", "categories present (all)", "rate"),
]
READER_INTRO = (
    "What a reconstruction shows, in the world's own terms: the share of test images whose attribute, "
    "read from the reconstruction by the world reader (a CNN trained on the pretraining corpus with the "
    "scene parameters as labels, `mindhier.world.reader`; it never saw a test image), is the stimulus's "
    "true one, with its 95 % Wilson interval. The stimuli row is the reader's ceiling; an attribute it "
    "reads from the stimuli below 90 % is shown as not readable. The majority row is a constant guess."
)


@torch.no_grad()
def reader_attribute_rates(reader_path: Path, world: Path, subject: int, rows: dict, gts: torch.Tensor,
                           image_index: np.ndarray, device: torch.device) -> list[tuple[str, dict]]:
    """The attribute table read by the released world reader (see READER_INTRO)."""
    from mindhier.data import SubjectIndex
    from mindhier.world import reader as R
    from mindhier.world.corpus import world_labels

    reader, _ = R.load_reader(reader_path, device)
    labels = world_labels(world)
    train_ids = np.unique(SubjectIndex(world, subject).train.image)
    return R.attribute_table(reader, gts, {k: v[image_index] for k, v in labels.items()},
                             {k: v[train_ids] for k, v in labels.items()}, rows)


def ridge_floor(world: Path, subject: int, image_index: np.ndarray, size: int) -> torch.Tensor:
    """Ridge from voxels to pixels: fit on training images (their trials' voxels averaged),
    penalty chosen by exact leave-one-out PixCorr, applied to the test images' averaged voxels."""
    from mindhier.data import ImageStore, SubjectIndex, TestSet, TrainTrials
    from mindhier.world.report import Ridge

    index = SubjectIndex(world, subject)
    train = TrainTrials(world, subject, index=index)
    test = TestSet(world, subject, policy="average", index=index)
    voxels = np.stack([train[i]["voxels"].numpy() for i in range(len(train))])
    images, inverse = np.unique(train.image_indices, return_inverse=True)
    x = np.zeros((len(images), voxels.shape[1]), np.float64)
    np.add.at(x, inverse, voxels)
    x /= np.bincount(inverse)[:, None]
    y = ImageStore(world).get(images).reshape(len(images), -1)
    ridge = Ridge(x.astype(np.float32))
    loo = ridge.loo_predictions(y, (0.01, 0.1, 1.0, 10.0))
    best = max(loo, key=lambda a: _mean_rowcorr(loo[a], y))
    predict = ridge.predictor(y, best)
    xt = np.stack([test[i]["voxels"].numpy() for i in range(len(image_index))])
    pred = predict(xt).reshape(len(image_index), 3, size, size)
    return torch.from_numpy(np.clip(pred, 0, 1).astype(np.float32))


def _mean_rowcorr(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)).mean())


def method_rows(recon) -> dict[str, torch.Tensor]:
    """The reconstruct folder's sets as the report's rows ("MindHier, single-shot" first; MindHier†
    when a low-level image was blended in)."""
    from mindhier.lowlevel import method_name

    return {f"{method_name(recon.settings)}, {label}": images for label, images in recon.sets.items()}


def score_rows(vision_path: Path, rows: dict[str, torch.Tensor], gts: torch.Tensor, dev: torch.device) -> dict:
    """Every offline metric of every row (the report's table; the release test's recomputation)."""
    from mindhier.evaluate import evaluate_reconstructions
    from mindhier.metrics import offline_metrics, pixel_metrics
    from mindhier.metrics.suite import ReferenceFeatures
    from mindhier.vision import load_vision

    vision = load_vision(vision_path, device=dev)
    metrics = pixel_metrics() + offline_metrics(lambda x: vision.image_embedding(x.to(dev)))
    reference = ReferenceFeatures()  # the stimuli's features once, not once per row
    return {name: evaluate_reconstructions(recons.float(), gts, metrics=metrics, device=dev,
                                           reference=reference)["values"]
            for name, recons in rows.items()}


def evaluate_and_report(world: Path, subject: int, ck: dict, recon_dir: Path, out: Path, recipe, timer,
                        device: str = "auto", reader: Path | None = None) -> dict:
    """Score every row, read what it shows (the world reader when ``reader`` is given, else the
    linear probes of `mindhier.world.attributes`) and write the report."""
    from mindhier.run_report import read_recon_folder, write_reconstruction_report
    from mindhier.runtime import resolve_device
    from mindhier.tokenizer import load_tokenizer
    from mindhier.vision import load_vision

    dev = resolve_device(device)
    recon = read_recon_folder(recon_dir)
    image_index, settings_json = recon.image_index, recon.settings
    gts = load_test_images(world, subject, image_index)
    rows = method_rows(recon)
    main_name = next(name for name in rows if name.endswith(f", {recon.primary}"))
    tokenizer = load_tokenizer(ck["tokenizer"], device=dev)
    rows["Ceiling: generator on true vision features"] = timer.run(
        "ceiling (true features)", true_feature_ceiling, ck, world, subject, gts, image_index, settings_json, dev)
    rows["Ceiling: tokenizer reconstruction"] = timer.run("ceiling (tokenizer)", tokenizer_ceiling, tokenizer,
                                                          gts.to(dev)).cpu()
    rows["Floor: ridge voxels → pixels"] = timer.run("floor (ridge)", ridge_floor, world, subject, image_index,
                                                     gts.shape[-1])
    scored = timer.run("evaluate", score_rows, ck["vision"], rows, gts, dev)
    if reader is not None:
        shown = timer.run("world reader", reader_attribute_rates, reader, world, subject, rows, gts, image_index, dev)
        attribute_table = {"key": "attributes", "title": "What the reconstructions show", "intro": READER_INTRO,
                           "rows": shown, "columns": READER_COLUMNS}
    else:
        vision = load_vision(ck["vision"], device=dev)
        shown = timer.run("attribute probes", attribute_rates, world, subject, rows, gts, image_index, tokenizer,
                          vision, dev)
        attribute_table = {"key": "attributes", "title": "What the reconstructions show", "intro": ATTRIBUTE_INTRO,
                           "rows": shown, "columns": ATTRIBUTE_COLUMNS}
    settings = {
        "data": f"synthetic world `{world}` (recipe {recipe.world}), subject {subject:02d}",
        "split": f"held-out test images (new_test), n = {len(gts)}",
        "averaging": "voxels averaged over the 3 repetitions before the encoder (MindHier's policy)",
        "sampling": json.dumps(settings_json.get("sampling", {})),
        "checkpoints": ", ".join(f"{k}: `{v}`" for k, v in ck.items()),
    }
    notes = [
        "CLIP-ours: two-way identification in the in-project small CLIP's embedding space; "
        "not comparable with CLIP ViT-L/14 numbers in papers.",
        "EffLite0: EfficientNet-Lite0 with real ImageNet weights (offline stand-in for EffNet-B1; not comparable).",
        "AlexNet(2/5), Inception-v3, CLIP ViT-L/14, EffNet-B1 and SwAV need weight files this offline "
        "demo does not have: `mindhier evaluate --weights-dir` computes them when you supply them.",
    ]
    paths = write_reconstruction_report(
        out, runs={"demo": recon}, shown={"demo": rows[main_name]}, stimuli={"demo": gts},
        n_images=recipe.report_images, n_strips=recipe.strips,
        title="mindhier demo: reconstructing images from simulated fMRI",
        intro=("A synthetic visual world with a simulated visual cortex (written in NSD's own layout) "
               "was decoded by the MindHier pipeline: hierarchical fMRI encoder → scale-aware "
               "coarse-to-fine generator → VQ-VAE decoder."),
        settings=settings, metric_rows=list(scored.items()), columns=METRIC_COLUMNS,
        timings=timer.seconds, notes=notes,
        extra_tables=[attribute_table],
    )
    stage_metrics = {"reconstruction": scored, "attributes": dict(shown)}
    return {"metrics": stage_metrics, "paths": paths}
