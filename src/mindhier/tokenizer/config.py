"""Tokenizer config: the VAR multi-scale residual VQ-VAE's shape, with named presets (SPEC §4).

The ``paper`` preset is VAR's ``vae_ch160v4096z32`` (also shipped as Switti's VQ-VAE): its
state dict has exactly the keys and shapes of the released checkpoints, so a user's real
weights load with strict key checking. The small presets keep the architecture and shrink
width, depth, image and latent so the toolkit runs on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from mindhier.config import ConfigError


@dataclass(frozen=True)
class VQVAEConfig:
    vocab_size: int = 4096  # V: codebook entries
    z_channels: int = 32  # Cvae: latent / codebook width
    ch: int = 160  # base width of the conv encoder/decoder
    ch_mult: tuple = (1, 1, 2, 2, 4)  # width multiplier per resolution level
    num_res_blocks: int = 2  # ResnetBlocks per encoder level (decoder has one more)
    image_size: int = 512  # H = W of the images the model takes (pixels)
    scales: tuple = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  # patch_nums: token map side per scale
    share_quant_resi: int = 4  # VAR's --qsr: 0 one φ per scale, 1 one φ for all, n ≥ 2 n shared φ
    quant_resi: float = 0.5  # φ(h) = (1 - r)·h + r·conv(h)
    beta: float = 0.25  # commitment weight
    norm_groups: int = 32  # GroupNorm groups (VAR: 32); small presets may need fewer
    use_attention: bool = True  # self-attention at the lowest level and in the mid block
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if list(self.scales) != sorted(set(self.scales)) or self.scales[0] < 1:
            raise ConfigError(f"VQVAEConfig.scales must be strictly increasing and >= 1, got {self.scales}")
        if self.image_size % self.downsample or self.image_size // self.downsample != self.scales[-1]:
            raise ConfigError(
                f"VQVAEConfig: image_size {self.image_size} / downsample {self.downsample} "
                f"(2^(len(ch_mult)-1)) must equal the last scale {self.scales[-1]} (the latent side)"
            )
        widths = [self.ch * m for m in self.ch_mult]
        if any(w % self.norm_groups for w in widths):
            raise ConfigError(f"VQVAEConfig: widths {widths} must be divisible by norm_groups {self.norm_groups}")
        if self.share_quant_resi < 0:
            raise ConfigError(f"VQVAEConfig.share_quant_resi must be >= 0 (0: one φ per scale, 1: one "
                              f"shared φ, n >= 2: n shared φ; VAR's default is 4), got {self.share_quant_resi}")

    @property
    def downsample(self) -> int:
        """Image pixels per latent cell along a side."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.scales[-1]

    @property
    def num_tokens(self) -> int:
        """L = Σ_k pn_k² (2240 for the 512-px schedule)."""
        return sum(pn * pn for pn in self.scales)


PRESETS: dict[str, VQVAEConfig] = {
    # VAR vae_ch160v4096z32 with the 512-px schedule (Switti / MindHier); 108,948,355 params.
    "paper": VQVAEConfig(),
    # Same weights, VAR's 256-px schedule.
    "paper256": VQVAEConfig(image_size=256, scales=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)),
    # The conformance model of /work/shared/reference (seeded random weights, 4.4 M params).
    "reference-small": VQVAEConfig(vocab_size=512, z_channels=16, ch=32, image_size=128, scales=(1, 2, 3, 4, 6, 8)),
    # The synthetic world's 64-px images: latent 8x8 (three 2x downsamplings). Width 16 at full
    # resolution keeps a training step on a CPU under a second; the width grows as the maps shrink.
    "demo": VQVAEConfig(
        vocab_size=1024, z_channels=16, ch=16, ch_mult=(1, 2, 4, 4), num_res_blocks=1,
        image_size=64, scales=(1, 2, 3, 4, 6, 8), norm_groups=8,
    ),
    # The demo's foundation tokenizer (the stand-in for VQVAE-Switti), trained on the 100 k-image
    # pretraining corpus (SPEC §1.4): the same 8x8 latent and schedule as `demo` (so the
    # generator's sequence stays 130 tokens on a CPU), with twice the width, VAR's codebook width
    # (Cvae 32) and 4x the codebook. `demo` (1.0 M params, 3 k world images) reconstructs the
    # backgrounds and loses the objects; see checkpoints/foundation/tokenizer.md for what this gets.
    "foundation": VQVAEConfig(
        vocab_size=4096, z_channels=32, ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1,
        image_size=64, scales=(1, 2, 3, 4, 6, 8), norm_groups=8,
    ),
    # 32-px images, latent 4x4: for tests and smoke runs.
    "tiny": VQVAEConfig(
        vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=1,
        image_size=32, scales=(1, 2, 3, 4), norm_groups=8,
    ),
}
