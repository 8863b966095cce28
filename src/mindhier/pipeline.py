"""One object from checkpoints to images: the frozen MindHier stack for notebooks and commands.

    import mindhier
    pipe = mindhier.Pipeline.from_pretrained("checkpoints/demo")       # or .from_checkpoints(...)
    test = mindhier.load_test_set("worlds/demo", subject=1, limit=8)
    out = pipe(test.voxels, image_ids=test.image_index, cfg=3, return_scales=True)
    out.images          # (8, 3, H, W) floats in [0, 1];  out.pil: 8 PIL images
    out.scales          # (8, K, 3, H, W): the picture after every scale, coarse to fine

The frozen encoder turns voxels into the hierarchy e_1..e_M; the generator samples the token
pyramid scale by scale under scale-aware guidance (CFG against the encoder's output for all-zero
voxels); the tokenizer decodes it. Image b's candidate c is seeded from (seed, image_ids[b], c),
so with the test set's image indices the images are exactly those of ``mindhier reconstruct``
(which is built on this object), whatever the batch. A pipeline folder (``save_pretrained``) holds
the four checkpoint pairs under standard names plus ``pipeline.json``, saying which file is which
and whom they fit; a folder with the standard names and no manifest (the released
``checkpoints/demo``) loads as well.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from mindhier.checkpoint import load_checkpoint, load_state_strict, paths_for, read_metadata
from mindhier.config import from_dict
from mindhier.errors import MindhierError
from mindhier.generator import Condition, GeneratorConfig, ScaleAwareGenerator
from mindhier.runtime import autocast, bf16_is_fast, resolve_device
from mindhier.sampling import Reconstructions, SamplingSettings, reconstruct

GENERATOR_KIND = "generator"
TRAINING_PREFIXES = ("optim.",)           # what a generator checkpoint carries besides the model
ROLES = ("encoder", "tokenizer", "generator")   # required; "vision" is optional (best-of-N only)
MANIFEST = "pipeline.json"
MANIFEST_FORMAT = "mindhier-pipeline"


class MismatchError(MindhierError, ValueError):
    """Checkpoints that were not trained together, or data of another subject."""


class PipelineError(MindhierError, ValueError):
    """A pipeline folder or an input that cannot be used as given."""


# ---------------------------------------------------------------------------------------------
# The frozen stack: whether its checkpoints belong together
# ---------------------------------------------------------------------------------------------

def checkpoint_identity(meta: dict) -> dict:
    """What identifies a checkpoint without hashing gigabytes: its kind, config hash, creation
    time and code commit (all recorded in its JSON when it was written)."""
    return {k: meta.get(k) for k in ("kind", "config_hash", "created", "git_commit")}


def generator_config_for(base: GeneratorConfig, encoder, tokenizer, **changes) -> GeneratorConfig:
    """``base`` with the interface fields taken from the frozen models: the tokenizer's schedule,
    vocabulary and latent width; the encoder's level count, tokens per level and token width."""
    return dataclasses.replace(
        base, scales=tuple(tokenizer.scales), vocab_size=int(tokenizer.vocab_size),
        z_channels=int(tokenizer.z_channels), context_dim=int(encoder.vision.feature_dim),
        pooled_dim=int(encoder.vision.feature_dim), num_levels=int(encoder.cfg.num_levels),
        tokens_per_level=int(encoder.vision.num_tokens), **changes)


def load_generator(path, device="cpu") -> tuple[ScaleAwareGenerator, dict]:
    """(generator in eval mode, metadata) from a ``mindhier train-generator`` checkpoint."""
    tensors, meta = load_checkpoint(path, kind=GENERATOR_KIND)
    model = ScaleAwareGenerator(from_dict(GeneratorConfig, meta["config"]))
    load_state_strict(model, {k: v for k, v in tensors.items() if not k.startswith(TRAINING_PREFIXES)},
                      paths_for(path)[0])
    return model.to(device).eval(), meta


def check_belongs(gen_meta: dict, enc_meta: dict, tok_meta: dict, paths: dict) -> None:
    """Refuse an encoder or tokenizer other than the ones the generator was trained with."""
    for role, meta in (("encoder", enc_meta), ("tokenizer", tok_meta)):
        expected = gen_meta.get(role)
        if expected is None:
            continue
        found = checkpoint_identity(meta)
        if expected != found:
            diffs = ", ".join(f"{k}: trained with {expected.get(k)!r}, given {found.get(k)!r}"
                              for k in expected if expected.get(k) != found.get(k))
            raise MismatchError(
                f"{paths[role]} is not the {role} the generator {paths['generator']} was trained with "
                f"({diffs}); pass the {role} checkpoint named in {paths_for(paths['generator'])[1]}")


def check_vision_belongs(enc_meta: dict, vision_path, encoder_path) -> None:
    """Refuse a small-CLIP checkpoint of another config than the encoder was aligned to (its
    embedding space is what best-of-N ranks in). Weights are not compared: a released copy in
    bf16 hashes differently from the fp32 original. Hugging Face folders are not checked."""
    expected = enc_meta.get("vision", {}).get("identity")
    path = Path(vision_path)
    if not expected or not paths_for(path)[1].is_file():
        return
    meta = read_metadata(path)
    if meta.get("kind") == "vision" and (expected.get("name") != meta.get("model")
                                         or expected.get("config") != meta.get("config")):
        raise MismatchError(
            f"{paths_for(path)[1]} is not the vision model the encoder {encoder_path} was aligned to "
            f"(it records {expected.get('name')} with config {expected.get('config')}); pass the vision "
            "checkpoint the encoder was trained against, or num_candidates=1 (--candidates 1)")


# ---------------------------------------------------------------------------------------------
# Voxels → conditions
# ---------------------------------------------------------------------------------------------

class Encoded(NamedTuple):
    cond: Condition
    null: Condition
    predicted: torch.Tensor            # (B, D) predicted image embedding (best-of-N ranks by it)
    levels: list[torch.Tensor]         # e_1..e_M, each (B, T, D), float32


@torch.no_grad()
def predict_hierarchy(encoder, voxels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(e_1..e_M as float32 (B, T, D), predicted embedding (B, D)) for voxels (B, V), or for
    (B, R, V) repetitions whose outputs are averaged (MindEye2's policy)."""
    from mindhier.encoder import encode_repetitions, predicted_embedding

    out = encode_repetitions(encoder, voxels)
    return [e.float() for e in out.levels], predicted_embedding(out).float()


@torch.no_grad()
def encode_voxels(encoder, generator: ScaleAwareGenerator, voxels: torch.Tensor) -> Encoded:
    """Condition, null condition, predicted embedding and hierarchy for a batch of voxels.

    The null condition is the encoder's output for all-zero voxels (SPEC §5): the input the
    generator saw for the 10 % of training samples whose voxels were dropped."""
    levels, predicted = predict_hierarchy(encoder, voxels)
    null_levels, _ = predict_hierarchy(encoder, voxels.new_zeros(1, voxels.shape[-1]))
    B = voxels.shape[0]
    return Encoded(generator.condition(levels),
                   generator.condition([e.expand(B, -1, -1) for e in null_levels]), predicted, levels)


def encode_conditions(encoder, generator: ScaleAwareGenerator, voxels: torch.Tensor):
    """(condition, null condition, predicted image embedding) for a batch of voxels (B, V)."""
    return encode_voxels(encoder, generator, voxels)[:3]


# ---------------------------------------------------------------------------------------------
# What a call returns
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PipelineOutput:
    """Reconstructions of B images, on the CPU, float32, in [0, 1].

    images      (B, 3, H, W)   the primary set: best-of-N when N > 1, else single-shot
    single_shot (B, 3, H, W)   candidate 0 of every image (the same as ``images`` when N = 1)
    label       "single-shot" or "best-of-N"
    image_ids   the B ids the seeds derived from
    scores      (B, N) cosine similarity of each candidate to the predicted embedding (N > 1)
    chosen      (B,) the winning candidate (N > 1)
    scales      (B, K, 3, H, W) the primary image after every scale (``return_scales=True``)
    hierarchy   e_1..e_M, each (B, T, D), coarse first (``return_hierarchy=True``)
    """

    images: torch.Tensor
    single_shot: torch.Tensor
    label: str
    image_ids: list[int]
    scores: torch.Tensor | None = None
    chosen: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    hierarchy: list[torch.Tensor] | None = None

    @property
    def pil(self) -> list:
        """The primary images as PIL images (RGB, H × W)."""
        from PIL import Image

        from mindhier.report import to_uint8

        return [Image.fromarray(tile) for tile in to_uint8(self.images.numpy())]

    def scales_strip(self, b: int, cell: int = 96):
        """Image b after every scale, side by side, as one PIL image (needs ``return_scales``)."""
        from mindhier.report import image_grid

        if self.scales is None:
            raise PipelineError("no per-scale pictures: call the pipeline with return_scales=True")
        return image_grid([self.scales[b].numpy()], cell=cell)

    @staticmethod
    def from_batch(rec: Reconstructions, ids: list[int], levels: list[torch.Tensor] | None) -> "PipelineOutput":
        primary = rec.labels[-1]
        scales = torch.stack(rec.cumulative[primary], dim=1).float().cpu() if rec.cumulative else None
        return PipelineOutput(
            images=rec.by_label(primary).float().cpu(), single_shot=rec.single_shot.float().cpu(), label=primary,
            image_ids=list(ids), scores=None if rec.scores is None else rec.scores.float().cpu(),
            chosen=None if rec.chosen is None else rec.chosen.cpu(), scales=scales,
            hierarchy=None if levels is None else [e.cpu() for e in levels])

    @staticmethod
    def cat(parts: list["PipelineOutput"]) -> "PipelineOutput":
        def join(name):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)

        first = parts[0]
        hierarchy = None if first.hierarchy is None else [torch.cat(level) for level in
                                                          zip(*(p.hierarchy for p in parts))]
        return PipelineOutput(images=join("images"), single_shot=join("single_shot"), label=first.label,
                              image_ids=[i for p in parts for i in p.image_ids], scores=join("scores"),
                              chosen=join("chosen"), scales=join("scales"), hierarchy=hierarchy)


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------

class Pipeline:
    """The frozen encoder, tokenizer and generator (+ the vision model for best-of-N) of one
    subject. Build it with :meth:`from_checkpoints` or :meth:`from_pretrained`; call it on voxels.

    ``precision="auto"`` samples in bf16 where that is fast (CUDA, CPUs with native bf16) and in
    fp32 elsewhere; ``"fp32"`` always in fp32. Attributes: ``device``, ``subject``,
    ``num_voxels``, ``image_size``, ``num_scales``, ``checkpoints`` (role → path) and
    ``metadata`` (role → the checkpoint's JSON)."""

    def __init__(self, encoder, tokenizer, generator: ScaleAwareGenerator, *, checkpoints: dict, metadata: dict,
                 device: torch.device, precision: str = "auto"):
        if precision not in ("auto", "fp32"):
            raise PipelineError(f"precision {precision!r} unknown; use 'auto' or 'fp32'")
        self.encoder, self.tokenizer, self.device, self.precision = encoder, tokenizer, device, precision
        if precision != "fp32" and bf16_is_fast(device):
            generator = generator.to(torch.bfloat16)   # cast once: autocast would re-cast every weight every scale
        self.generator = generator
        self.checkpoints, self.metadata = dict(checkpoints), dict(metadata)
        self.subject = self.metadata["encoder"].get("subject")
        self.num_voxels = int(encoder.num_voxels)
        self.image_size = int(tokenizer.image_size)
        self.num_scales = int(generator.cfg.num_scales)
        self._vision = None

    # ---- building -------------------------------------------------------------------------
    @classmethod
    def from_checkpoints(cls, encoder, tokenizer, generator, vision=None, *, subject: int | None = None,
                         device: str | torch.device = "auto", precision: str = "auto") -> "Pipeline":
        """Load the three stage checkpoints (each a ``NAME.safetensors`` + ``NAME.json`` pair; pass
        either file or the stem) and check they were trained together. ``vision`` (only needed
        for best-of-N) defaults to the model the encoder checkpoint records, when it exists.
        ``subject``, when given, must be the encoder's."""
        from mindhier.encoder import load_encoder
        from mindhier.tokenizer import load_tokenizer

        device = resolve_device(device)
        paths = {"encoder": encoder, "tokenizer": tokenizer, "generator": generator}
        gen_model, gen_meta = load_generator(generator, device)
        enc_model, enc_meta = load_encoder(encoder, device=device)
        tok_meta = read_metadata(tokenizer)              # JSON only: the weights are read once, below
        check_belongs(gen_meta, enc_meta, tok_meta, paths)
        trained_on = enc_meta.get("subject")
        if subject is not None and trained_on is not None and int(trained_on) != int(subject):
            raise MismatchError(f"{encoder} was trained on subject {trained_on}, not subject {subject}; "
                                "encoders are subject-specific: pass the encoder of that subject")
        vision = vision_checkpoint(vision) if vision is not None else recorded_vision(enc_meta)
        if vision is not None:
            check_vision_belongs(enc_meta, vision, encoder)
            paths["vision"] = vision
        return cls(enc_model, load_tokenizer(tokenizer, device=device), gen_model,
                   checkpoints={k: Path(v) for k, v in paths.items()},
                   metadata={"encoder": enc_meta, "tokenizer": tok_meta, "generator": gen_meta},
                   device=device, precision=precision)

    @classmethod
    def from_pretrained(cls, folder, *, device: str | torch.device = "auto", precision: str = "auto") -> "Pipeline":
        """Load a pipeline folder: one written by :meth:`save_pretrained` (``pipeline.json``
        names the files), or one with the standard names ``encoder``, ``tokenizer``,
        ``generator`` (+ ``vision``), each a .safetensors + .json pair, such as the released
        ``checkpoints/demo``."""
        from mindhier.pipeline_folder import check_manifest, find_checkpoints

        files, manifest = find_checkpoints(folder)
        pipe = cls.from_checkpoints(files["encoder"], files["tokenizer"], files["generator"], files.get("vision"),
                                    device=device, precision=precision)
        if manifest is not None:
            check_manifest(manifest, pipe, folder)
        return pipe

    def save_pretrained(self, folder, *, overwrite: bool = False) -> Path:
        """Write this pipeline's checkpoints (model weights only, training state dropped; their
        JSON unchanged) under the standard names, plus ``pipeline.json``. Returns the folder."""
        from mindhier.pipeline_folder import save_folder

        return save_folder(self, folder, overwrite=overwrite)

    # ---- the vision model (best-of-N) -----------------------------------------------------
    @property
    def vision(self):
        """The frozen vision model best-of-N ranks candidates with (loaded on first use), or None."""
        if self._vision is None and "vision" in self.checkpoints:
            from mindhier.vision import load_vision

            self._vision = load_vision(self.checkpoints["vision"], device=self.device).freeze()
        return self._vision

    def image_embedder(self):
        """[0, 1] images (B, 3, H, W) → the vision model's image embeddings, what best-of-N ranks by."""
        if self.vision is None:
            recorded = self.metadata["encoder"].get("vision", {}).get("path")
            names = f"names {recorded}, which is not here" if recorded else "names none"
            raise PipelineError(
                f"best-of-N ranks candidates with the vision model the encoder was trained against, and "
                f"{paths_for(self.checkpoints['encoder'])[1]} {names}: pass vision=PATH to "
                "Pipeline.from_checkpoints (command: --vision) or use num_candidates=1 (--candidates 1)")
        vision = self.vision
        return lambda images01: vision.image_embedding(images01.to(self.device))

    # ---- inputs ---------------------------------------------------------------------------
    def check_voxel_count(self, num_voxels: int, where="the voxels") -> None:
        """A clear error when data of ``num_voxels`` voxels cannot go into this encoder."""
        from mindhier.encoder import VoxelCountError

        if int(num_voxels) != self.num_voxels:
            raise VoxelCountError(
                f"{where} has {num_voxels} voxels, but the encoder {paths_for(self.checkpoints['encoder'])[0]} was "
                f"trained on {self.num_voxels} voxels (subject {self.subject}); an encoder is subject-specific: "
                f"give subject {self.subject}'s voxels (e.g. mindhier.load_test_set(DATA, subject={self.subject})) "
                "or the pipeline of your subject")

    def _voxels(self, voxels) -> torch.Tensor:
        v = torch.as_tensor(voxels)
        if v.ndim not in (2, 3) or not v.is_floating_point():
            raise PipelineError(
                f"voxels must be floats shaped (B, {self.num_voxels}) (repetitions averaged) or "
                f"(B, R, {self.num_voxels}) (outputs averaged); got {v.dtype} {tuple(v.shape)}"
                + (" — for one image pass voxels[None]" if v.ndim == 1 else ""))
        if v.shape[0] == 0:
            raise PipelineError("no voxels: the batch is empty")
        self.check_voxel_count(v.shape[-1], f"voxels of shape {tuple(v.shape)}")
        return v.to(self.device, torch.float32)

    # ---- running --------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, voxels) -> list[torch.Tensor]:
        """The predicted hierarchy e_1..e_M (coarse first), each (B, T, D) float32 on the CPU."""
        v = self._voxels(voxels)
        with autocast(self.device, enabled=self.precision != "fp32"):
            levels, _ = predict_hierarchy(self.encoder, v)
        return [e.cpu() for e in levels]

    @torch.no_grad()
    def __call__(self, voxels, num_candidates: int = 1, cfg: float = 6.0, seed: int = 0, *,
                 top_k: int = 400, top_p: float = 0.95, cfg_off_from: int | None = None,
                 image_ids: Sequence[int] | None = None, return_scales: bool = False,
                 return_hierarchy: bool = False, batch_size: int = 8) -> PipelineOutput:
        """Reconstruct B images from voxels: (B, V) z-scored betas with repetitions averaged
        (MindHier's policy) or (B, R, V) whose encoder outputs are averaged (MindEye2's).

        Image b's candidate c draws from a generator seeded by (seed, image_ids[b], c);
        ``image_ids`` defaults to 0..B−1 — pass the test set's image indices to get the images of
        ``mindhier reconstruct``. With ``num_candidates`` N > 1 the candidates are ranked by the
        cosine similarity of their vision embedding to the encoder's predicted embedding (never
        the ground truth). ``cfg`` is the guidance at the last scale (ramped from 0; paper 6,
        the demo 3); ``batch_size`` images run per pass and do not change the result."""
        settings = SamplingSettings(cfg=cfg, top_k=top_k, top_p=top_p, cfg_off_from=cfg_off_from, seed=seed,
                                    num_candidates=num_candidates)
        v = self._voxels(voxels)
        ids = [int(i) for i in (range(v.shape[0]) if image_ids is None else image_ids)]
        if len(ids) != v.shape[0]:
            raise PipelineError(f"{len(ids)} image_ids for {v.shape[0]} images: give one id per image")
        embed = self.image_embedder() if num_candidates > 1 else None
        parts = []
        for start in range(0, len(ids), max(1, int(batch_size))):
            rows = slice(start, start + max(1, int(batch_size)))
            parts.append(self._batch(v[rows], ids[rows], settings, embed, return_scales, return_hierarchy))
        return PipelineOutput.cat(parts)

    def _batch(self, voxels, ids, settings, embed, return_scales, return_hierarchy) -> PipelineOutput:
        with autocast(self.device, enabled=self.precision != "fp32"):
            enc = encode_voxels(self.encoder, self.generator, voxels)
            rec = reconstruct(self.generator, self.tokenizer, enc.cond, enc.null, settings, ids,
                              predicted=enc.predicted, embed_images=embed, return_cumulative=return_scales)
        return PipelineOutput.from_batch(rec, ids, enc.levels if return_hierarchy else None)

    def __repr__(self) -> str:
        files = ", ".join(f"{role}={path}" for role, path in self.checkpoints.items())
        return (f"Pipeline(subject={self.subject}, num_voxels={self.num_voxels}, image_size={self.image_size}, "
                f"scales={self.num_scales}, device={self.device}, {files})")


def vision_checkpoint(path) -> Path:
    """A ``train-vision --out`` folder stands for the checkpoint pair inside it (as in load_vision)."""
    path = Path(path)
    return path / "vision" if path.is_dir() and paths_for(path / "vision")[1].is_file() else path


def recorded_vision(enc_meta: dict) -> Path | None:
    """The vision model the encoder checkpoint records, if it exists on this machine."""
    path = enc_meta.get("vision", {}).get("path")
    if path and (Path(path).is_dir() or paths_for(path)[1].is_file()):
        return vision_checkpoint(path)
    return None

