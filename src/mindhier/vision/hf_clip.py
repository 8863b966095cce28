"""Real CLIP (the paper's ViT-L/14) from a local folder in the Hugging Face layout (SPEC §2).

The folder is what ``huggingface-cli download openai/clip-vit-large-patch14 --local-dir DIR``
writes on a machine with internet; mindhier only ever reads it (``local_files_only=True``), so
it never reaches a hub. Weights load through transformers: safetensors preferred; a
``pytorch_model.bin`` is accepted only because transformers opens it with
``torch.load(weights_only=True)`` (no arbitrary unpickling).

Feature conventions (checked in tests against an independent computation):
- image level g = ``visual_projection(post_layernorm(hidden_states[g]))`` on all 257 tokens,
  ``hidden_states[0]`` = embedding output after CLIP's ``pre_layrnorm``;
- text tokens = ``text_model(input_ids).last_hidden_state`` (final LN, 77 tokens, not projected).
  Captions are padded to 77 with the tokenizer's pad token and no attention mask is passed, as
  OpenAI's CLIP text tower runs (causal attention: tokens up to <|endoftext|> never see padding).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from mindhier.vision.base import VisionError, VisionHierarchy, scaled_layer_map

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HOW_TO_GET = (
    "On a machine with internet run `huggingface-cli download openai/clip-vit-large-patch14 "
    "--local-dir clip-vit-large-patch14` (or `hf download ...`) and copy that folder here; it must hold "
    "config.json, model.safetensors, and the tokenizer files (tokenizer.json, or vocab.json + merges.txt)."
)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _make_transformers_importable() -> None:
    """transformers imports torchvision when it is installed; the pinned torchvision wheel needs
    the CPU-torch shim of :mod:`mindhier.metrics.tv` to import at all (SPEC §8)."""
    from mindhier.metrics.tv import import_torchvision

    try:
        import_torchvision()
    except ImportError:
        pass  # torchvision not installed: transformers does not import it either


def check_hf_dir(path) -> dict:
    """Validate a local CLIP folder before transformers sees it; return its config.json."""
    root = Path(path)
    if not root.is_dir():
        raise VisionError(f"CLIP folder {root} does not exist. {HOW_TO_GET}")
    missing = []
    if not (root / "config.json").exists():
        missing.append("config.json")
    if not any((root / f).exists() for f in WEIGHT_FILES):
        missing.append("model.safetensors (weights)")
    if not ((root / "tokenizer.json").exists() or
            ((root / "vocab.json").exists() and (root / "merges.txt").exists())):
        missing.append("tokenizer.json or vocab.json + merges.txt (tokenizer)")
    if not missing and not any((root / f).exists() for f in WEIGHT_FILES[:2]):
        warnings.warn(f"{root}: only pytorch_model.bin weights; transformers reads them with "
                      "torch.load(weights_only=True) (no arbitrary code), but model.safetensors is preferred "
                      "(the same Hugging Face repository has it)", stacklevel=3)
    if missing:
        raise VisionError(f"CLIP folder {root} is incomplete: missing {', '.join(missing)}. {HOW_TO_GET}")
    try:
        config = json.loads((root / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise VisionError(f"{root / 'config.json'} is not valid JSON ({err}). {HOW_TO_GET}") from err
    if config.get("model_type") != "clip":
        raise VisionError(
            f"{root / 'config.json'} has model_type {config.get('model_type')!r}; mindhier needs the full "
            f"CLIP (model_type 'clip': image and text towers), e.g. openai/clip-vit-large-patch14. {HOW_TO_GET}"
        )
    return config


def _weights_hash(root: Path) -> str:
    """Identity of the weights without reading gigabytes: file names, sizes and the first and
    last MiB of each weight file (a different checkpoint differs there)."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.iterdir() if p.name.startswith(("model", "pytorch_model"))):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _preprocessor_settings(root: Path, image_size: int) -> dict:
    """CLIP's preprocessing from preprocessor_config.json, defaulting to OpenAI's values."""
    settings = {"resize": image_size, "crop": image_size, "mean": CLIP_MEAN, "std": CLIP_STD}
    path = root / "preprocessor_config.json"
    if path.exists():
        cfg = json.loads(path.read_text())
        size, crop = cfg.get("size", image_size), cfg.get("crop_size", image_size)
        settings["resize"] = size.get("shortest_edge", image_size) if isinstance(size, dict) else int(size)
        settings["crop"] = crop.get("height", image_size) if isinstance(crop, dict) else int(crop)
        settings["mean"] = tuple(cfg.get("image_mean", CLIP_MEAN))
        settings["std"] = tuple(cfg.get("image_std", CLIP_STD))
    return settings


class HFClip(VisionHierarchy):
    """A transformers ``CLIPModel`` (+ its tokenizer) as a frozen vision hierarchy."""

    def __init__(self, model, tokenizer, root: Path):
        super().__init__()
        vcfg, tcfg = model.config.vision_config, model.config.text_config
        self.model, self.tokenizer, self.root = model, tokenizer, root
        self.name = f"hf_clip[{root.name}]"
        self.num_layers = vcfg.num_hidden_layers
        self.num_tokens = (vcfg.image_size // vcfg.patch_size) ** 2 + 1
        self.feature_dim = model.config.projection_dim
        self.text_tokens, self.text_dim = tcfg.max_position_embeddings, tcfg.hidden_size
        self.settings = _preprocessor_settings(root, vcfg.image_size)
        self.image_size = self.settings["crop"]
        if self.image_size != vcfg.image_size:
            raise VisionError(f"{root}: preprocessor crop {self.image_size} != model image_size {vcfg.image_size}")
        # ViT-L/14 (24 layers) -> (12, 16, 20, 24): g_m = 8 + 4m (paper §4.4).
        self.default_layers = scaled_layer_map("balanced", self.num_layers)
        self._identity: dict | None = None
        self.freeze()

    def preprocess(self, images01: torch.Tensor) -> torch.Tensor:
        """Resize the shortest side bicubically, centre-crop, clamp (as uint8 would), CLIP mean/std."""
        h, w = images01.shape[-2:]
        scale = self.settings["resize"] / min(h, w)
        size = (max(self.settings["resize"], round(h * scale)), max(self.settings["resize"], round(w * scale)))
        x = images01
        if (h, w) != size:
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        crop = self.settings["crop"]
        top, left = (x.shape[-2] - crop) // 2, (x.shape[-1] - crop) // 2
        x = x[..., top: top + crop, left: left + crop].clamp(0, 1)
        mean = torch.tensor(self.settings["mean"], device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.settings["std"], device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def _hidden_states(self, pixels, upto):
        return list(self.model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states)

    def _post_ln_project(self, hidden):
        return self.model.visual_projection(self.model.vision_model.post_layernorm(hidden))

    def _text_forward(self, captions):
        ids = self.tokenizer(captions, padding="max_length", max_length=self.text_tokens, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        out = self.model.text_model(input_ids=ids)
        return out.last_hidden_state, self.model.text_projection(out.pooler_output)

    def identity(self) -> dict:
        if self._identity is None:
            self._identity = {"name": "hf_clip", "folder": self.root.name, "weights": _weights_hash(self.root),
                              "preprocess": {k: list(v) if isinstance(v, tuple) else v
                                             for k, v in self.settings.items()}}
        return self._identity


def load_hf_clip(path, device=None, dtype: torch.dtype | None = None) -> HFClip:
    """Load a local CLIP folder (never a hub) as a frozen :class:`HFClip`."""
    root = Path(path)
    check_hf_dir(root)
    _make_transformers_importable()
    from transformers import CLIPModel, CLIPTokenizer

    try:
        model = CLIPModel.from_pretrained(root, local_files_only=True, dtype=dtype or torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError) as err:
        raise VisionError(f"cannot load the CLIP folder {root}: {err}. {HOW_TO_GET}") from err
    wrapped = HFClip(model, tokenizer, root)
    return wrapped.to(device) if device is not None else wrapped
