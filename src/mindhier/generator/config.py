"""Generator configuration, presets and the scale-aware routing table (paper §3.3, SPEC §5)."""

from __future__ import annotations

from dataclasses import dataclass

from mindhier.config import ConfigError

ROUTINGS = ("scale-aware", "inverted", "single", "none")

SCHEDULE_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
SCHEDULE_SMALL = (1, 2, 3, 4, 6, 8)


@dataclass(frozen=True)
class GeneratorConfig:
    """Shape of the stage-2 transformer and how it reads the fMRI hierarchy.

    The interface fields (``scales``, ``vocab_size``, ``z_channels``: the tokenizer's;
    ``context_dim``, ``pooled_dim``, ``num_levels``, ``tokens_per_level``: the encoder's) must
    match the frozen models it is trained with; ``mindhier train-generator`` fills them in from
    their checkpoints.
    """

    depth: int = 2
    width: int = 64
    num_heads: int = 2
    scales: tuple[int, ...] = SCHEDULE_SMALL
    vocab_size: int = 512
    z_channels: int = 16            # Cvae: width of the VQ-VAE latent (teacher-forcing input)
    context_dim: int = 64           # D of each fMRI token e_m
    pooled_dim: int = 64            # width of the pooled vector (mean of e_M's tokens)
    num_levels: int = 4             # M
    tokens_per_level: int = 17      # T
    routing: str = "scale-aware"    # one of ROUTINGS
    cond_drop_prob: float = 0.1     # CFG: voxels zeroed before the frozen encoder (training loop)
    # Rescale each level to a mean token norm of 1 before use. The encoder is trained on
    # l2-normalised targets (paper Eq. 1), so only the direction of e_m carries meaning; with the
    # norm removed, a generator pretrained on the vision model's own v_{g_m} (SPEC §1.4) reads
    # the encoder's e_m on the same scale when stage 2 fine-tunes it.
    level_norm: bool = False
    # 2-D RoPE on cross-attention too: queries and the context's keys placed on the image plane
    # (blocks.image_plane_angles), each level read as [CLS, g×g patches]. Without it the keys carry
    # no position and a token can find "its" patch only through content; measured on the demo
    # world, the pretrained generator's attention mass on its own patch was at chance (issue 11).
    # Not in MindHier or Switti (their context is text or fMRI tokens with no grid): an addition.
    cross_rope: bool = False
    ffn_mult: float = 8 / 3         # SwiGLU hidden = int(width · ffn_mult)
    rope_theta: float = 10000.0
    rope_size: int = 128            # every scale's grid is stretched to span this many positions
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.routing not in ROUTINGS:
            raise ConfigError(f"routing {self.routing!r} is not one of {ROUTINGS}")
        if self.width % self.num_heads or (self.width // self.num_heads) % 4:
            raise ConfigError(
                f"width {self.width} / {self.num_heads} heads must give a head size divisible by 4 "
                f"(2-D RoPE rotates x and y in separate halves)"
            )
        if self.routing != "none" and self.num_levels > len(self.scales):
            raise ConfigError(
                f"scale-aware routing needs M ≤ K (paper §3.3); got M={self.num_levels} levels "
                f"for K={len(self.scales)} scales"
            )

        if self.cross_rope and self.context_grid is None:
            raise ConfigError(
                f"cross_rope reads each level as [CLS, g×g patches]; tokens_per_level={self.tokens_per_level} "
                f"is not 1 + a square")

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def context_grid(self) -> int | None:
        """g when each level is [CLS, g×g patches] (tokens_per_level = 1 + g²), else None."""
        g = round((self.tokens_per_level - 1) ** 0.5)
        return g if g > 0 and g * g + 1 == self.tokens_per_level else None

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def seq_len(self) -> int:
        """L = Σ pn²: tokens of the whole pyramid."""
        return sum(pn * pn for pn in self.scales)

    @property
    def first_len(self) -> int:
        """Tokens of the first scale (given by the start token, not by the teacher-forcing input)."""
        return self.scales[0] ** 2

    @property
    def ffn_hidden(self) -> int:
        return int(self.width * self.ffn_mult)

    @property
    def context_len(self) -> int:
        return self.num_levels * self.tokens_per_level


def routing_table(cfg: GeneratorConfig) -> tuple[int | None, ...]:
    """h_k for k = 1..K: the level e_{h_k} whose tokens scale k cross-attends to.

    ``scale-aware`` (paper §3.3): h_k = M − ⌊M(k−1)/K⌋, coarse scales read the deep semantic
    e_M and fine scales the shallow e_1 (K = 10, M = 4 → 4 4 4 3 3 2 2 2 1 1). ``inverted``
    (Table 4 ablation) flips it: h_k → M + 1 − h_k. ``single``: every scale reads e_M (Table 2's
    single-feature baseline). ``none``: no routing, every scale sees the whole context (None).
    The table is computed from this config's own schedule, never hard-coded for 512 px.
    """
    K, M = cfg.num_scales, cfg.num_levels
    coarse_to_fine = tuple(M - (M * k) // K for k in range(K))  # k = 0-based scale index
    if cfg.routing == "scale-aware":
        return coarse_to_fine
    if cfg.routing == "inverted":
        return tuple(M + 1 - h for h in coarse_to_fine)
    if cfg.routing == "single":
        return (M,) * K
    return (None,) * K


def seed_level(cfg: GeneratorConfig) -> int:
    """The level whose pooled tokens give the start token and the AdaLN vector: the level that
    the first scale reads (e_M, or e_1 for the inverted ablation, which "is seeded with e_1")."""
    first = routing_table(cfg)[0]
    return cfg.num_levels if first is None else first


PRESETS: dict[str, GeneratorConfig] = {
    # Seconds on a CPU: for tests and the CI-sized demo path.
    "tiny": GeneratorConfig(),
    # The synthetic-world demo: small enough to train on a laptop CPU in minutes.
    # cross_rope: the demo's addition (see the field); off in the paper preset, as in MindHier.
    "demo": GeneratorConfig(depth=6, width=256, num_heads=4, vocab_size=1024, z_channels=16,
                            context_dim=128, pooled_dim=128, tokens_per_level=17, cross_rope=True),
    # The paper's stage 2 (appendix E): Switti-512 body, fMRI context of 4 × 257 tokens × 768.
    "paper": GeneratorConfig(depth=30, width=1920, num_heads=30, scales=SCHEDULE_512,
                             vocab_size=4096, z_channels=32, context_dim=768, pooled_dim=768,
                             num_levels=4, tokens_per_level=257),
    # The upstream conformance model (shared/reference/switti_small_config.json), routing off.
    "reference-small": GeneratorConfig(depth=2, width=128, num_heads=2, scales=SCHEDULE_SMALL,
                                       vocab_size=512, z_channels=16, context_dim=2048,
                                       pooled_dim=1280, num_levels=1, tokens_per_level=20,
                                       routing="none"),
}
