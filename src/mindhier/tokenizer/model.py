"""``MultiScaleVQVAE``: VAR's multi-scale residual VQ-VAE with the API the generator uses.

Images at this API are in [-1, 1] (the VAR convention); ``images01_to_input`` and
``output_to_images01`` convert from and to the toolkit's [0, 1] images. Token maps are lists
with one LongTensor (B, pn_k²) per scale, row-major.
"""

from __future__ import annotations

import torch
from torch import nn

from mindhier.errors import MindhierError
from mindhier.tokenizer.blocks import Decoder, Encoder, conv3x3
from mindhier.tokenizer.config import VQVAEConfig
from mindhier.tokenizer.quant import ResidualQuantizer


class TokenizerInputError(MindhierError, ValueError):
    """Images or token maps that do not fit the tokenizer's config."""


class MultiScaleVQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = ResidualQuantizer(
            cfg.vocab_size, cfg.z_channels, cfg.scales, share_quant_resi=cfg.share_quant_resi,
            quant_resi=cfg.quant_resi, beta=cfg.beta,
        )
        self.quant_conv = conv3x3(cfg.z_channels, cfg.z_channels)
        self.post_quant_conv = conv3x3(cfg.z_channels, cfg.z_channels)

    # ----- shape facts -----------------------------------------------------------------------
    @property
    def scales(self) -> tuple:
        return tuple(self.cfg.scales)

    @property
    def num_tokens(self) -> int:
        """L = Σ_k pn_k²."""
        return self.cfg.num_tokens

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def z_channels(self) -> int:
        return self.cfg.z_channels

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    def phi_index(self, k: int) -> int:
        """Which φ conv scale k uses (VAR's rule, see quant.py; 10 scales, 4 φ: 0,0,1,1,1,2,2,3,3,3)."""
        return self.quantize.phi_index(k)

    # ----- value ranges -----------------------------------------------------------------------
    @staticmethod
    def images01_to_input(x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> the model's [-1, 1] input."""
        return x * 2.0 - 1.0

    @staticmethod
    def output_to_images01(y: torch.Tensor) -> torch.Tensor:
        """The model's [-1, 1] output -> [0, 1] images (clamped)."""
        return ((y + 1.0) / 2.0).clamp(0.0, 1.0)

    # ----- checks -----------------------------------------------------------------------------
    def check_images(self, img: torch.Tensor) -> None:
        expected = (3, self.cfg.image_size, self.cfg.image_size)
        if img.ndim != 4 or tuple(img.shape[1:]) != expected:
            raise TokenizerInputError(
                f"tokenizer expects images of shape (B, {', '.join(map(str, expected))}) in [-1, 1], "
                f"got {tuple(img.shape)}; resize the images to cfg.image_size={self.cfg.image_size} "
                f"RGB (or pick the preset whose image_size matches your data)"
            )

    def check_indices(self, indices: list[torch.Tensor], upto: int | None = None) -> list[torch.Tensor]:
        """Validate a list of per-scale token maps (possibly only the first ``upto`` scales)."""
        want = len(self.scales) if upto is None else upto
        if len(indices) != want:
            raise TokenizerInputError(f"expected token maps for {want} scales {self.scales[:want]}, got {len(indices)}")
        out = []
        for k, idx in enumerate(indices):
            pn = self.scales[k]
            if idx.ndim == 3:
                idx = idx.flatten(1)
            if idx.ndim != 2 or idx.shape[1] != pn * pn:
                raise TokenizerInputError(f"token map of scale {k} must be (B, {pn * pn}) (pn={pn}), got {tuple(idx.shape)}")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.vocab_size):
                raise TokenizerInputError(f"token map of scale {k} has indices outside [0, {self.vocab_size})")
            out.append(idx.long())
        return out

    # ----- encoding ---------------------------------------------------------------------------
    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """Continuous latent f = quant_conv(encoder(img)), (B, Cvae, n, n)."""
        self.check_images(img)
        return self.quant_conv(self.encoder(img))

    @torch.no_grad()
    def img_to_indices(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Token maps r_1..r_K of images in [-1, 1]: one LongTensor (B, pn_k²) per scale."""
        return self.quantize.encode(self.encode(img))[0]

    # ----- decoding ---------------------------------------------------------------------------
    def embed_indices(self, k: int, idx: torch.Tensor) -> torch.Tensor:
        """Codebook lookup of scale k's tokens (B, pn²) as a map (B, Cvae, pn, pn)."""
        return self.quantize.code_map(k, idx.long())

    def cumulative_fhats(self, indices: list[torch.Tensor]) -> list[torch.Tensor]:
        """f̂ after each scale (each (B, Cvae, n, n)); accepts a prefix of the schedule."""
        return self.quantize.cumulative_fhats(self.check_indices(indices, upto=len(indices)))

    def indices_to_fhat(self, indices: list[torch.Tensor]) -> torch.Tensor:
        return self.quantize.cumulative_fhats(self.check_indices(indices))[-1]

    def fhat_to_img(self, fhat: torch.Tensor) -> torch.Tensor:
        """Decode a latent to an image (B, 3, H, W) clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(fhat)).clamp(-1.0, 1.0)

    def indices_to_img(self, indices: list[torch.Tensor]) -> torch.Tensor:
        return self.fhat_to_img(self.indices_to_fhat(indices))

    def cumulative_images(self, indices: list[torch.Tensor]) -> list[torch.Tensor]:
        """The image after each scale (coarse-to-fine pictures), each in [-1, 1]."""
        return [self.fhat_to_img(f) for f in self.cumulative_fhats(indices)]

    # ----- the generator's inputs -------------------------------------------------------------
    def teacher_forcing_input(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """Input tokens of scales 2..K for teacher forcing: (B, L − pn_1², Cvae)."""
        return self.quantize.teacher_forcing_input(self.check_indices(indices))

    def next_scale_input(self, k: int, fhat: torch.Tensor | None, h_k: torch.Tensor):
        """One sampling step: add scale k's code map h_k (B, Cvae, pn_k, pn_k) to f̂ (None or
        zeros at k = 0); return (f̂_new, next input (B, pn_{k+1}², Cvae), or None after the
        last scale). ``teacher_forcing_input`` is exactly these steps chained."""
        pn = self.scales[k]
        if tuple(h_k.shape[1:]) != (self.z_channels, pn, pn):
            raise TokenizerInputError(
                f"h_k of scale {k} must be (B, {self.z_channels}, {pn}, {pn}), got {tuple(h_k.shape)}; "
                "build it with embed_indices(k, idx)"
            )
        return self.quantize.next_scale_input(k, fhat, h_k)

    # ----- training ---------------------------------------------------------------------------
    def forward(self, img: torch.Tensor, residual_sample: int = 0):
        """(reconstruction in [-1, 1] (unclamped), VQ loss, usage stats) for training."""
        fhat, vq_loss, stats = self.quantize(self.encode(img), residual_sample=residual_sample)
        return self.decoder(self.post_quant_conv(fhat)), vq_loss, stats
