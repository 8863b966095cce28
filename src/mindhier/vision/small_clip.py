"""The in-project small CLIP: the offline stand-in for CLIP ViT-L/14 (SPEC §2).

Same anatomy as CLIP, scaled to the synthetic world: a ViT image tower (patch conv, CLS token,
positions, pre-LN, pre-norm transformer blocks, post-LN, bias-free projection) and a causal text
transformer over a word-level vocabulary built from the world's captions (final LN, projection
of the end-of-text token), trained with a learnable logit scale by ``mindhier train-vision``.

``SmallClipModel`` is the trainable network; ``SmallClip`` wraps a trained one as a frozen
:class:`~mindhier.vision.base.VisionHierarchy`. Checkpoints are ``mindhier.checkpoint`` pairs of
kind ``"vision"`` whose JSON carries the config and the tokenizer vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mindhier.checkpoint import load_checkpoint, load_state_strict, model_tensors, read_metadata
from mindhier.config import config_hash, dict_hash, from_dict, to_dict
from mindhier.vision.base import VisionError, VisionHierarchy, scaled_layer_map

KIND = "vision"
MODEL_NAME = "small_clip"
CHECKPOINT_NAME = "vision"  # train-vision writes OUT/vision.safetensors + OUT/vision.json
# CLIP's normalisation constants, reused so both backbones see inputs on the same scale.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class SmallClipConfig:
    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    layers: int = 8
    heads: int = 4
    text_len: int = 40  # sot + words + eot, padded (world captions have <= 32 words); longer ones are cut
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    embed_dim: int = 128  # the shared projection space (CLIP-L: 768)
    mlp_ratio: int = 4
    vocab_size: int = 0  # 0 in presets: set from the world's captions when training starts
    stem: str = "patch"  # "patch": one stride-p conv (CLIP); "conv": stride-2 3×3 convs (conv_stem);
    #                      "convnet": a residual conv trunk, two 3×3 convs per halving (convnet_stem)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


# tiny: tests (32 px, 4x4 patches + CLS; 8 thin layers so the three layer maps differ).
# demo: 64 px, 8x8 patches + CLS, 8 layers x 128 — sized to train in minutes on a CPU; the layer
#   maps scale to {4,5,7,8} (balanced), {2,4,6,8} (early), {5,6,7,8} (late).
# large: 64 px with 4x4 patches = 257 tokens like ViT-L/14@224, 12 layers (maps scale exactly:
#   {6,8,10,12}, {3,6,9,12}, {9,10,11,12}); meant for a GPU.
PRESETS = {
    "tiny": SmallClipConfig(image_size=32, patch_size=8, width=32, layers=8, heads=2, text_len=40,
                            text_width=32, text_layers=2, text_heads=2, embed_dim=32),
    "demo": SmallClipConfig(),
    "large": SmallClipConfig(image_size=64, patch_size=4, width=256, layers=12, heads=8,
                             text_width=256, text_layers=6, text_heads=8, embed_dim=256),
    # foundation: demo with a convolutional stem — an experiment, not (yet) the recipe's. With
    # CLIP's patchify stem, 2 epochs of the 98 k corpus (with shape-swapped negatives) left the
    # main object's shape unreadable in every layer (linear probe 8-12 % on the demo world's test
    # stimuli, chance 11 %; colour 60-79 %). With this stem the loss tracked the patchify run's
    # over the first 550 steps (0.42 vs 0.46, the shape-blind floor being ≈ 0.35): no sign yet
    # that it learns shape; stopped there.
    "foundation": SmallClipConfig(stem="conv"),
    # hybrid: a hybrid ViT (Dosovitskiy et al. 2021, §3.1 "Hybrid Architecture"): the 8×8 token
    # grid comes from a small residual CNN (two 3×3 convs per halving, like the world reader's
    # trunk) instead of one patchify conv, then the same 8 transformer layers. The stems above
    # left the main object's shape at chance in every layer; a CNN of this shape learns it from
    # labels in ~2000 steps (the world reader). Measured results: checkpoints/foundation/vision.md.
    "hybrid": SmallClipConfig(stem="convnet"),
}


def conv_stem(width: int, patch: int) -> nn.Sequential:
    """log2(patch) stride-2 3×3 convolutions (channels doubling up to ``width``) and a 1×1
    projection: the "early convolutions" of Xiao et al. (NeurIPS 2021), which give a ViT local
    shape features within each patch that one linear patchify has to discover from scratch."""
    steps = int(math.log2(patch))
    if 2 ** steps != patch:
        raise VisionError(f"the conv stem needs a power-of-two patch size, got {patch}")
    chans = [3] + [max(width // 2 ** (steps - 1 - i), 16) for i in range(steps)]
    layers = []
    for cin, cout in zip(chans[:-1], chans[1:]):
        layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), ChannelNorm(cout), nn.GELU()]
    return nn.Sequential(*layers, nn.Conv2d(chans[-1], width, 1))


def convnet_stem(width: int, patch: int) -> nn.Sequential:
    """A residual CNN trunk that turns the image into the (H/p × W/p) token grid: per halving a
    stride-2 3×3 conv (channels doubling up to ``width``) then a residual 3×3 conv, each followed
    by a per-position channel norm and GELU. Deeper than :func:`conv_stem` (two convs per level),
    so shape (edges → corners → outlines) is built before the transformer sees a token."""
    steps = int(math.log2(patch))
    if 2 ** steps != patch:
        raise VisionError(f"the convnet stem needs a power-of-two patch size, got {patch}")
    chans = [3] + [max(width // 2 ** (steps - 1 - i), 16) for i in range(steps)]
    layers: list[nn.Module] = []
    for cin, cout in zip(chans[:-1], chans[1:]):
        layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), ChannelNorm(cout), nn.GELU(),
                   ResidualConv(cout)]
    return nn.Sequential(*layers, nn.Conv2d(chans[-1], width, 1))


class ResidualConv(nn.Module):
    """x + GELU(norm(conv3×3(x))): a stride-1 conv that can start as (almost) the identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = ChannelNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.norm(self.conv(x)))


STEMS = {"conv": conv_stem, "convnet": convnet_stem}


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of each position of a (B, C, H, W) map: local, unlike
    GroupNorm(1, C), so a token depends only on the pixels its receptive field covers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


# ---- word-level tokenizer -----------------------------------------------------------------
PAD, UNK, SOT, EOT = "<pad>", "<unk>", "<sot>", "<eot>"
SPECIALS = (PAD, UNK, SOT, EOT)
_WORD = re.compile(r"[a-z0-9]+")


def words(caption: str) -> list[str]:
    return _WORD.findall(caption.lower())


def build_vocab(captions) -> list[str]:
    """Specials then every caption word, sorted: deterministic for a given caption set."""
    seen = {w for c in captions for w in words(str(c)) if c}
    return list(SPECIALS) + sorted(seen)


class WordTokenizer:
    """Lower-cased words -> ids: [<sot>, w1, ..., <eot>, <pad>...] of fixed length."""

    def __init__(self, vocab: list[str], length: int):
        if list(vocab[: len(SPECIALS)]) != list(SPECIALS):
            raise VisionError(f"tokenizer vocabulary must start with {SPECIALS}")
        self.vocab, self.length = list(vocab), length
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def encode(self, captions: list[str]) -> torch.Tensor:
        ids = torch.full((len(captions), self.length), self.index[PAD], dtype=torch.long)
        unk = self.index[UNK]
        for row, caption in enumerate(captions):
            body = [self.index.get(w, unk) for w in words(caption)][: self.length - 2]
            seq = [self.index[SOT], *body, self.index[EOT]]
            ids[row, : len(seq)] = torch.tensor(seq)
        return ids


# ---- network --------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm transformer block (attention + GELU MLP), as in CLIP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.fc2 = nn.Linear(mlp_ratio * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, t, 3, self.heads, w // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=self.causal)
        x = x + self.out(att.transpose(1, 2).reshape(b, t, w))
        return x + self.fc2(F.gelu(self.fc1(self.ln_2(x))))


class VisionTower(nn.Module):
    def __init__(self, cfg: SmallClipConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise VisionError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        if cfg.stem not in ("patch", *STEMS):
            raise VisionError(f"unknown stem {cfg.stem!r}; use one of patch, {', '.join(STEMS)}")
        self.patch = (nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False) if cfg.stem == "patch"
                      else STEMS[cfg.stem](cfg.width, cfg.patch_size))
        self.cls = nn.Parameter(torch.randn(cfg.width) * cfg.width**-0.5)
        self.pos = nn.Parameter(torch.randn(cfg.num_tokens, cfg.width) * 0.02)
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio, causal=False)
                                    for _ in range(cfg.layers))
        self.ln_post = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.embed_dim, bias=False)

    def hidden_states(self, pixels: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """[embedding output (after ln_pre), block 1 output, ..., block ``upto`` output]."""
        x = self.patch(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1) + self.pos.to(x.dtype)
        states = [self.ln_pre(x)]
        for block in self.blocks[: len(self.blocks) if upto is None else upto]:
            states.append(block(states[-1]))
        return states

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(self.ln_post(hidden))


class TextTower(nn.Module):
    def __init__(self, cfg: SmallClipConfig):
        super().__init__()
        if cfg.vocab_size < len(SPECIALS):
            raise VisionError("SmallClipConfig.vocab_size is unset; build the vocabulary from the captions first")
        self.token = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.pos = nn.Parameter(torch.randn(cfg.text_len, cfg.text_width) * 0.01)
        self.blocks = nn.ModuleList(Block(cfg.text_width, cfg.text_heads, cfg.mlp_ratio, causal=True)
                                    for _ in range(cfg.text_layers))
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        self.eot_id = SPECIALS.index(EOT)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(final-LN tokens (B,Tt,Dt), projected end-of-text token (B,D)). Causal attention
        means the padding after <eot> never reaches the tokens CLIP pools."""
        x = self.token(ids) + self.pos
        for block in self.blocks:
            x = block(x)
        tokens = self.ln_final(x)
        eot = (ids == self.eot_id).int().argmax(dim=1)
        return tokens, self.proj(tokens[torch.arange(ids.shape[0], device=ids.device), eot])


class SmallClipModel(nn.Module):
    """The trainable two-tower model; ``forward`` returns unit embeddings and the logit scale."""

    def __init__(self, cfg: SmallClipConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg)
        self.text = TextTower(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's init

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual.project(self.visual.hidden_states(pixels)[-1][:, 0])

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor):
        image = F.normalize(self.encode_image(pixels), dim=-1)
        text = F.normalize(self.text(ids)[1], dim=-1)
        return image, text, self.logit_scale.exp().clamp(max=100.0)


def normalise_images(images01: torch.Tensor, size: int) -> torch.Tensor:
    """Resize to the model's size when needed (bicubic, antialiased), then CLIP mean/std."""
    if images01.shape[-2:] != (size, size):
        images01 = F.interpolate(images01, size=(size, size), mode="bicubic", antialias=True,
                                 align_corners=False).clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=images01.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images01.device).view(1, 3, 1, 1)
    return (images01 - mean) / std


# ---- frozen hierarchy ------------------------------------------------------------------------
class SmallClip(VisionHierarchy):
    """A trained :class:`SmallClipModel` as a frozen vision hierarchy (g_m scaled to its depth)."""

    def __init__(self, model: SmallClipModel, vocab: list[str], source: str = ""):
        super().__init__()
        cfg = model.cfg
        self.model, self.cfg, self.source = model, cfg, source
        self.tokenizer = WordTokenizer(vocab, cfg.text_len)
        self.name = f"{MODEL_NAME}[{cfg.layers}x{cfg.width}]"
        self.num_layers, self.num_tokens = cfg.layers, cfg.num_tokens
        self.feature_dim, self.image_size = cfg.embed_dim, cfg.image_size
        self.text_tokens, self.text_dim = cfg.text_len, cfg.text_width
        self.default_layers = scaled_layer_map("balanced", cfg.layers)
        self._identity: dict | None = None
        self.freeze()

    def preprocess(self, images01: torch.Tensor) -> torch.Tensor:
        return normalise_images(images01, self.image_size)

    def _hidden_states(self, pixels, upto):
        return self.model.visual.hidden_states(pixels, upto)

    def _post_ln_project(self, hidden):
        return self.model.visual.project(hidden)

    def _text_forward(self, captions):
        return self.model.text(self.tokenizer.encode(captions).to(self.device))

    def identity(self) -> dict:
        if self._identity is None:
            self._identity = {"name": MODEL_NAME, "config": to_dict(self.cfg),
                              "weights": weights_hash(self.model.state_dict(), extra=self.tokenizer.vocab),
                              "preprocess": f"bicubic {self.image_size}px, CLIP mean/std"}
        return self._identity


def weights_hash(state: dict[str, torch.Tensor], extra=None) -> str:
    """sha256 over sorted tensor names, shapes, dtypes and bytes (+ any JSON-able extra)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{key}{tuple(state[key].shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if extra is not None:
        h.update(repr(extra).encode())
    return h.hexdigest()[:16]


def is_small_clip_checkpoint(path) -> bool:
    try:
        meta = read_metadata(path)
    except Exception:
        return False
    return meta.get("kind") == KIND and meta.get("model") == MODEL_NAME


def load_small_clip(path, device=None, config: SmallClipConfig | None = None) -> SmallClip:
    """Load a ``mindhier train-vision`` checkpoint as a frozen :class:`SmallClip`.

    ``config``, when given, must equal the checkpoint's (fields that differ are named)."""
    tensors, meta = load_checkpoint(path, kind=KIND, config=config)
    if meta.get("model") != MODEL_NAME or "vocab" not in meta:
        raise VisionError(f"{path} is a vision checkpoint but not a small CLIP one (no tokenizer vocabulary)")
    cfg = from_dict(SmallClipConfig, meta["config"])
    if meta.get("config_hash") not in (None, config_hash(cfg), dict_hash(meta["config"])):
        raise VisionError(f"{path}: config hash mismatch; the JSON was edited by hand or is damaged")
    model = SmallClipModel(cfg)
    load_state_strict(model, model_tensors(tensors), where=path)
    wrapped = SmallClip(model, meta["vocab"], source=str(path))
    return wrapped.to(device) if device is not None else wrapped


def resolve_config(preset: SmallClipConfig, vocab: list[str]) -> SmallClipConfig:
    """A preset completed with the vocabulary size of the captions it is trained on."""
    return dataclasses.replace(preset, vocab_size=len(vocab))


def save_small_clip(path, model: SmallClipModel, vocab: list[str], *, tensors: dict | None = None,
                    extra: dict | None = None):
    """Write a kind-"vision" checkpoint: weights (+ optional extra tensors such as optimiser
    state, prefixed ``optim.``) and JSON with config, vocabulary and any manifest."""
    from mindhier.checkpoint import save_checkpoint  # local: keeps the import list short

    if len(vocab) != model.cfg.vocab_size:
        raise VisionError(f"vocabulary has {len(vocab)} words but the model was built for {model.cfg.vocab_size}")
    state = {k: v for k, v in model.state_dict().items()}
    state.update(tensors or {})
    return save_checkpoint(path, state, kind=KIND, config=model.cfg,
                           extra={"model": MODEL_NAME, "vocab": list(vocab), **(extra or {})})
