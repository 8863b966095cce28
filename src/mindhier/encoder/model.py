"""The Hierarchical fMRI Encoder (HFE, paper §3.1; SPEC §3).

    voxels (B, V)
      └─ MLP: Linear(V→h1) → GELU → Linear(h1→h2) → GELU → Linear(h2→F·d)
         reshape to F fMRI tokens of width d, + learned positional embedding
      ├─ image branch: T learned queries → M cascaded transformer-decoder layers
      │     (self-attention over the queries, cross-attention to the fMRI tokens, FFN);
      │     the output of layer m IS e_m, the m-th level of the hierarchy (coarse = e_1)
      │     image_final = Linear(d→D)(e_M)
      └─ text branch: Tt learned queries → the same kind of stack over the same fMRI tokens
            text = Linear(d→Dt)(last text layer)

Every width matches the vision model the encoder is aligned to (d = D = its projected feature
width, T its token count, Tt/Dt its text tokens/width), so e_m compares token-by-token with the
vision target v_{g_m}. With CLIP ViT-L/14 (T=257, D=768, Tt=77, Dt=768), the ``paper`` preset
(h1=4096, h2=2048, F=100, M=4, 4 text layers, 8 heads, FFN 3072) has exactly 307,292,160
parameters for subject 1 (15,724 voxels): the official model's count. That count pins the
layer composition: eight ``nn.TransformerDecoderLayer`` (three LayerNorms each, no extra final
norm), four per branch, no norms or biases beyond those in the MLP.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SUPERVISIONS = ("hierarchical", "final-only", "single")
MSE_REDUCTIONS = ("sample", "element")


@dataclass(frozen=True)
class EncoderConfig:
    """Shape and training objective of the HFE. Widths tied to the vision model (tokens, feature
    width, text tokens/width) are not here: they come from :class:`VisionShape` at construction.

    supervision (paper Table 2): "hierarchical" = Eq. 1 on every level + Eq. 2 (the full model);
    "final-only" = same architecture, MSE only on the terminal level; "single" = the terminal
    feature is the only one: trained like "final-only", and ``levels`` hands e_M to every
    consumer (the generator's routing then sees one feature at every scale).
    mse_reduction: "sample" = Eq. 1 literally, ‖ℓ2(e) − ℓ2(v)‖² per sample (= 2 − 2·cos), mean
    over the batch; "element" = ``nn.MSELoss`` (mean over every element, i.e. Eq. 1 / (T·D)),
    which at T·D ≈ 2·10⁵ makes the structural terms vanish next to SoftCLIP.
    """

    mlp_hidden: tuple[int, ...] = (4096, 2048)
    fmri_tokens: int = 100
    num_levels: int = 4  # M: image-branch decoder layers, one hierarchy level each
    text_layers: int = 4
    heads: int = 8
    ffn_ratio: float = 4.0  # FFN width = ffn_ratio · d (3072 for d = 768)
    dropout: float = 0.1
    norm_first: bool = False  # post-norm: every e_m leaves a LayerNorm
    supervision: str = "hierarchical"
    tau: float = 0.005  # SoftCLIP temperature
    mse_reduction: str = "sample"

    def __post_init__(self) -> None:
        if self.supervision not in SUPERVISIONS:
            raise ValueError(f"supervision must be one of {SUPERVISIONS}, got {self.supervision!r}")
        if self.mse_reduction not in MSE_REDUCTIONS:
            raise ValueError(f"mse_reduction must be one of {MSE_REDUCTIONS}, got {self.mse_reduction!r}")
        if self.num_levels < 1 or self.text_layers < 1:
            raise ValueError("num_levels and text_layers must be at least 1")


PRESETS: dict[str, EncoderConfig] = {
    # CI: seconds on one CPU thread.
    "tiny": EncoderConfig(mlp_hidden=(128, 64), fmri_tokens=8, text_layers=2, heads=2, dropout=0.0),
    # The offline demo on 2 CPU cores: minutes per run.
    "demo": EncoderConfig(mlp_hidden=(512, 256), fmri_tokens=16, text_layers=2, heads=4),
    # The official model (≈ 307 M parameters for subject 1 with CLIP ViT-L/14).
    "paper": EncoderConfig(),
}


@dataclass(frozen=True)
class VisionShape:
    """What the encoder must produce to be compared with the vision model's targets."""

    num_tokens: int  # T (257 for CLIP ViT-L/14: CLS + 16×16 patches)
    feature_dim: int  # D = encoder width d (projected CLIP width, 768)
    text_tokens: int  # Tt (77)
    text_dim: int  # Dt (768)

    @classmethod
    def of(cls, vision: Any) -> "VisionShape":
        """Read the shape off anything with the four attributes (a VisionHierarchy, a cache)."""
        return cls(*(int(getattr(vision, f.name)) for f in dataclasses.fields(cls)))


CLIP_VIT_L14 = VisionShape(num_tokens=257, feature_dim=768, text_tokens=77, text_dim=768)


@dataclass
class EncoderOutput:
    """levels: e_1..e_M, each (B, T, D), coarse/early-layer first (for "single" supervision,
    M copies of e_M). image_final: Linear(e_M), (B, T, D), compared with the final vision layer.
    text: (B, Tt, Dt), compared with the text encoder's tokens (training only)."""

    levels: list[torch.Tensor]
    image_final: torch.Tensor
    text: torch.Tensor


class HierarchicalFMRIEncoder(nn.Module):
    # The one subject-specific layer: Linear(V→h1), V the subject's voxel count (the official
    # code's multi-subject mode gives each subject its own, ``ridge``, and shares the rest).
    INPUT_LAYER = "mlp.0"

    def __init__(self, cfg: EncoderConfig, num_voxels: int, vision: VisionShape):
        super().__init__()
        self.cfg, self.num_voxels, self.vision = cfg, int(num_voxels), vision
        d = vision.feature_dim
        if d % cfg.heads:
            raise ValueError(f"feature width {d} is not divisible by {cfg.heads} heads")
        widths = (self.num_voxels, *cfg.mlp_hidden)
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.GELU()]
        layers.append(nn.Linear(widths[-1], cfg.fmri_tokens * d))
        self.mlp = nn.Sequential(*layers)
        self.fmri_pos = nn.Parameter(torch.randn(1, cfg.fmri_tokens, d) * 0.02)
        self.image_queries = nn.Parameter(torch.randn(1, vision.num_tokens, d) * 0.02)
        self.text_queries = nn.Parameter(torch.randn(1, vision.text_tokens, d) * 0.02)
        self.image_layers = nn.ModuleList(self._decoder_layer() for _ in range(cfg.num_levels))
        self.text_layers = nn.ModuleList(self._decoder_layer() for _ in range(cfg.text_layers))
        self.image_proj = nn.Linear(d, vision.feature_dim)
        self.text_proj = nn.Linear(d, vision.text_dim)

    def _decoder_layer(self) -> nn.TransformerDecoderLayer:
        d = self.vision.feature_dim
        return nn.TransformerDecoderLayer(
            d_model=d, nhead=self.cfg.heads, dim_feedforward=round(self.cfg.ffn_ratio * d),
            dropout=self.cfg.dropout, activation="gelu", batch_first=True,
            norm_first=self.cfg.norm_first,
        )

    def fmri_tokens(self, voxels: torch.Tensor) -> torch.Tensor:
        """(B, V) voxels → (B, F, d) fMRI tokens (the memory both branches cross-attend to)."""
        if voxels.ndim != 2 or voxels.shape[1] != self.num_voxels:
            raise ValueError(
                f"HFE expects voxels of shape (batch, {self.num_voxels}), got {tuple(voxels.shape)}"
            )
        tokens = self.mlp(voxels).view(voxels.shape[0], self.cfg.fmri_tokens, -1)
        return tokens + self.fmri_pos

    def forward(self, voxels: torch.Tensor) -> EncoderOutput:
        memory = self.fmri_tokens(voxels)
        batch = voxels.shape[0]
        x = self.image_queries.expand(batch, -1, -1)
        levels = []
        for layer in self.image_layers:  # cascaded: level m refines level m-1
            x = layer(x, memory)
            levels.append(x)
        t = self.text_queries.expand(batch, -1, -1)
        for layer in self.text_layers:
            t = layer(t, memory)
        if self.cfg.supervision == "single":
            levels = [levels[-1]] * len(levels)
        return EncoderOutput(levels=levels, image_final=self.image_proj(levels[-1]), text=self.text_proj(t))


def predicted_embedding(out: EncoderOutput) -> torch.Tensor:
    """The predicted pooled image embedding, (B, D): token 0 (CLS) of ``image_final``.

    Why this is comparable with the vision model's image embedding: the final target is
    ``projection(post_LN(hidden_states[L]))`` on every token (SPEC §2), and CLIP's pooled
    ``image_embeds`` is exactly that expression on the CLS token, so the CLS row of the
    predicted final layer lives in the same space (cosine-compare it with a candidate image's
    embedding for best-of-N ranking, or with ``final_embedding`` targets for retrieval)."""
    return out.image_final[:, 0]


def encode_repetitions(model: nn.Module, voxels: torch.Tensor) -> EncoderOutput:
    """The encoder on (B, V) voxels (repetitions averaged before it: MindHier's test policy), or
    on each of (B, R, V) repetitions with every output averaged over R in float32 (MindEye2's)."""
    if voxels.ndim == 2:
        return model(voxels)
    B, R = voxels.shape[:2]
    out = model(voxels.flatten(0, 1))

    def mean(x: torch.Tensor) -> torch.Tensor:
        return x.float().unflatten(0, (B, R)).mean(1)

    return EncoderOutput([mean(e) for e in out.levels], mean(out.image_final), mean(out.text))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
