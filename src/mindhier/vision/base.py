"""The frozen vision–language hierarchy that stage 1 aligns to (paper §3.2, SPEC §2).

One interface for every backbone (real CLIP ViT-L/14 from a local folder, or the in-project
small CLIP trained on the synthetic world). Per image it yields the *projected token features*
of chosen transformer layers,

    v_g = visual_projection(post_layernorm(hidden_states[g]))      on ALL tokens (CLS + patches)

where ``hidden_states[0]`` is the embedding output (HF convention: patch + position embeddings
after the pre-LayerNorm) and ``hidden_states[L]`` the last layer, so ``v_L[:, 0]`` is exactly
CLIP's image embedding. Per caption it yields the text tokens (the text tower's final-LN
``last_hidden_state``, *not* projected: SPEC §2) and the text embedding.

Subclasses implement four hooks (``preprocess``, ``_hidden_states``, ``_post_ln_project``,
``_text_forward``); everything public runs under ``torch.no_grad`` on a frozen, eval-mode model.
"""

from __future__ import annotations

import torch
from torch import nn

from mindhier.errors import MindhierError

# The paper's CLIP ViT-L/14 layer maps (24 layers; Table 3). "balanced" is MindHier's choice
# g_m = 8 + 4m; "early" is g_m = 6m; "late" is g_m = 16 + 2m.
PAPER_DEPTH = 24
LAYER_MAPS: dict[str, tuple[int, ...]] = {
    "balanced": (12, 16, 20, 24),
    "early": (6, 12, 18, 24),
    "late": (18, 20, 22, 24),
}


class VisionError(MindhierError, ValueError):
    """A vision model that is missing, incomplete, or asked for something it does not have."""


def scaled_layer_map(name: str, depth: int) -> tuple[int, ...]:
    """The paper's layer map ``name`` moved to a backbone with ``depth`` layers.

    Each layer keeps its *relative depth*: g -> round(g · depth / 24). CLIP-L's balanced map
    {12,16,20,24} covers the upper half of the tower at even steps, so a 12-layer model gets
    {6,8,10,12} and an 8-layer one {4,5,7,8}. When rounding makes two layers collide (shallow
    models, the "late" map), earlier ones step down so the M levels stay distinct — the map's
    meaning (which end of the tower it favours) survives, its exact spacing cannot.
    """
    if name not in LAYER_MAPS:
        raise VisionError(f"unknown layer map {name!r}; choose one of {sorted(LAYER_MAPS)}")
    paper = LAYER_MAPS[name]
    if depth < len(paper):
        raise VisionError(f"a {depth}-layer backbone cannot host {len(paper)} distinct levels")
    if depth == PAPER_DEPTH:
        return paper
    scaled = [max(1, round(g * depth / PAPER_DEPTH)) for g in paper]
    for m in range(len(scaled) - 2, -1, -1):  # walk down from the top, keeping levels distinct
        scaled[m] = min(scaled[m], scaled[m + 1] - 1)
    if scaled[0] < 1:
        raise VisionError(f"cannot scale layer map {name!r} to depth {depth}")
    return tuple(scaled)


class VisionHierarchy(nn.Module):
    """A frozen image/text model exposing its layer-wise token features (see module doc).

    Attributes every backbone sets: ``num_layers`` (L; hidden_states has L+1 entries),
    ``num_tokens`` (image tokens incl. CLS), ``feature_dim`` (projection dim D), ``text_tokens``
    (Tt), ``text_dim`` (Dt), ``default_layers`` (g_1..g_M), ``image_size``, ``name``.
    """

    num_layers: int
    num_tokens: int
    feature_dim: int
    text_tokens: int
    text_dim: int
    default_layers: tuple[int, ...]
    image_size: int
    name: str

    # ---- hooks for subclasses -------------------------------------------------------------
    def preprocess(self, images01: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) floats in [0,1] -> the backbone's normalised input."""
        raise NotImplementedError

    def _hidden_states(self, pixels: torch.Tensor, upto: int) -> list[torch.Tensor]:
        """hidden_states[0..upto] (each (B,T,W)) for preprocessed pixels."""
        raise NotImplementedError

    def _post_ln_project(self, hidden: torch.Tensor) -> torch.Tensor:
        """visual_projection(post_layernorm(hidden)) for every token: (B,T,W) -> (B,T,D)."""
        raise NotImplementedError

    def _text_forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(text tokens (B,Tt,Dt) after the final LN, text embedding (B,D))."""
        raise NotImplementedError

    def identity(self) -> dict:
        """What a target cache is keyed on: name, weights hash, preprocessing (JSON-able)."""
        raise NotImplementedError

    # ---- frozen-ness ------------------------------------------------------------------------
    def freeze(self) -> "VisionHierarchy":
        """Eval mode and no gradients, for good: targets must not move during stage 1."""
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "VisionHierarchy":
        # A parent calling .train() must not switch the frozen targets into training mode.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ---- public API ----------------------------------------------------------------------
    def check_layers(self, layers) -> tuple[int, ...]:
        layers = tuple(int(g) for g in layers)
        bad = [g for g in layers if not 0 <= g <= self.num_layers]
        if bad or not layers:
            raise VisionError(
                f"{self.name} has hidden states 0..{self.num_layers} (0 = embedding output); "
                f"layers {list(layers)} are not all in that range (default {list(self.default_layers)})"
            )
        return layers

    def _pixels(self, images01: torch.Tensor) -> torch.Tensor:
        if images01.ndim != 4 or images01.shape[1] != 3:
            raise VisionError(f"{self.name}: images must be (B,3,H,W) in [0,1], got {tuple(images01.shape)}")
        return self.preprocess(images01.to(self.device, torch.float32)).to(self.dtype)

    @torch.no_grad()
    def image_targets(self, images01: torch.Tensor, layers) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One forward pass: ([v_g (B,T,D) for g in layers], image embedding (B,D)), float32."""
        layers = self.check_layers(layers)
        hidden = self._hidden_states(self._pixels(images01), upto=self.num_layers)
        feats = [self._post_ln_project(hidden[g]).float() for g in layers]
        # CLIP's image_embeds: projection of the post-LN CLS token of the last layer.
        final = self._post_ln_project(hidden[self.num_layers][:, :1])[:, 0].float()
        return feats, final

    @torch.no_grad()
    def image_layer_features(self, images01: torch.Tensor, layers) -> list[torch.Tensor]:
        """[visual_projection(post_layernorm(hidden_states[g])) (B,T,D) for g in layers]."""
        layers = self.check_layers(layers)
        hidden = self._hidden_states(self._pixels(images01), upto=max(layers))
        return [self._post_ln_project(hidden[g]).float() for g in layers]

    @torch.no_grad()
    def image_embedding(self, images01: torch.Tensor) -> torch.Tensor:
        """CLIP image_embeds (B,D): projection of the post-LN CLS token of the last layer."""
        return self.image_targets(images01, [self.num_layers])[1]

    @torch.no_grad()
    def text_features(self, captions: list[str]) -> torch.Tensor:
        """Text tower tokens (B,Tt,Dt) after its final LayerNorm, not projected (SPEC §2)."""
        return self._text_forward(self._check_captions(captions))[0].float()

    @torch.no_grad()
    def text_embedding(self, captions: list[str]) -> torch.Tensor:
        """CLIP text_embeds (B,D): projection of the end-of-text token."""
        return self._text_forward(self._check_captions(captions))[1].float()

    @torch.no_grad()
    def text_targets(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(text_features, text_embedding) from one forward pass."""
        tokens, emb = self._text_forward(self._check_captions(captions))
        return tokens.float(), emb.float()

    def _check_captions(self, captions) -> list[str]:
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise VisionError(f"{self.name}: captions must be a list of strings")
        return list(captions)
