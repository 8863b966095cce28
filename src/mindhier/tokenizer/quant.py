"""Multi-scale residual quantiser of VAR (paper §3.3, Eq. 3; SPEC §4).

Encoding a latent f (B, C, n, n) into K token maps r_1..r_K (scale k has side pn_k):

    rest = f, f̂ = 0
    for k = 1..K:
        z_k  = area-downsample(rest) to pn_k × pn_k      (last scale: no resampling)
        r_k  = argmin_n ‖z_k − Z[n]‖₂                      (Eq. 3, per position)
        h_k  = φ_k(bicubic-upsample(Z[r_k]) to n × n)       (last scale: no resampling)
        f̂  += h_k ; rest −= h_k

φ_k(h) = (1 − q)·h + q·conv3x3(h) with q = ``quant_resi``. Which conv scale k uses follows VAR's
quant.py (``share_quant_resi``, VAR's ``--qsr``):

    0   PhiNonShared        one φ per scale (K convs)
    1   PhiShared           one φ for every scale
    n≥2 PhiPartiallyShared  n convs; scale k takes the conv whose tick is nearest to k/(K−1)

with ticks linspace(1/3n, 1 − 1/3n, n) when n == 4 and linspace(1/2n, 1 − 1/2n, n) otherwise
(the non-shared list uses the same ticks with n = K, which maps scale k to conv k). So the
10-scale schedule with 4 convs gives 0,0,1,1,1,2,2,3,3,3 and with 3 convs 0,0,0,0,1,1,1,2,2,2.
The generator's input for scale k+1 is the area-downsample of the running f̂ to pn_{k+1}
(teacher forcing and sampling build it identically).

Parameter and buffer names (``embedding``, ``quant_resi.qresi_ls.{i}`` / ``quant_resi.qresi`` /
``quant_resi.{i}``, ``ema_vocab_hit_SV``) follow VAR's checkpoints.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mindhier.config import ConfigError


class Phi(nn.Conv2d):
    """φ(h) = (1 − ratio)·h + ratio·conv3x3(h): a learned correction of the upsampled codes."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1.0 - self.ratio) + super().forward(h) * self.ratio


def phi_ticks(count: int) -> np.ndarray:
    """VAR's tick positions of ``count`` φ convs on [0, 1] (float64, as VAR's numpy ticks)."""
    if count == 4:
        return np.linspace(1 / 3 / count, 1 - 1 / 3 / count, count)
    return np.linspace(1 / 2 / count, 1 - 1 / 2 / count, count)


def nearest_tick(ticks: np.ndarray, at: float) -> int:
    # ``at`` is the Python float k/(K-1), compared in float64 exactly as VAR does: the near ties
    # (k = 2 and 7 of 10 scales with 4 convs, k = 3 and 6 with 3) then resolve as in VAR.
    return int(np.argmin(np.abs(ticks - at)))


class PhiPartiallyShared(nn.Module):
    """``share_quant_resi`` ≥ 2 φ convs shared across the K scales by nearest tick (VAR's default, 4)."""

    def __init__(self, phis: list[Phi]):
        super().__init__()
        self.qresi_ls = nn.ModuleList(phis)
        self.ticks = phi_ticks(len(phis))

    def index_for(self, at: float) -> int:
        return nearest_tick(self.ticks, at)

    def conv(self, i: int) -> Phi:
        return self.qresi_ls[i]


class PhiShared(nn.Module):
    """``share_quant_resi`` = 1: one φ for every scale."""

    def __init__(self, phi: Phi):
        super().__init__()
        self.qresi = phi

    def index_for(self, at: float) -> int:
        return 0

    def conv(self, i: int) -> Phi:
        return self.qresi


class PhiNonShared(nn.ModuleList):
    """``share_quant_resi`` = 0: one φ per scale, picked by the same nearest-tick rule as VAR."""

    def __init__(self, phis: list[Phi]):
        super().__init__(phis)
        self.ticks = phi_ticks(len(phis))

    def index_for(self, at: float) -> int:
        return nearest_tick(self.ticks, at)

    def conv(self, i: int) -> Phi:
        return self[i]


def make_phis(share_quant_resi: int, num_scales: int, channels: int, ratio: float) -> nn.Module:
    """VAR's choice of φ sharing from ``share_quant_resi`` (its ``--qsr``); see the module doc."""
    if share_quant_resi < 0:
        raise ConfigError(f"share_quant_resi must be >= 0 (0: one φ per scale, 1: one shared φ, "
                          f"n >= 2: n shared φ), got {share_quant_resi}")
    if share_quant_resi == 0:
        return PhiNonShared([Phi(channels, ratio) for _ in range(num_scales)])
    if share_quant_resi == 1:
        return PhiShared(Phi(channels, ratio))
    return PhiPartiallyShared([Phi(channels, ratio) for _ in range(share_quant_resi)])


def phi_table(share_quant_resi: int, num_scales: int) -> list[int]:
    """Which φ conv each of ``num_scales`` scales uses (the index table, without building convs)."""
    count = {0: num_scales, 1: 1}.get(share_quant_resi, share_quant_resi)
    ticks = phi_ticks(count)
    last = num_scales - 1
    return [nearest_tick(ticks, k / last if last else 0.0) for k in range(num_scales)]


class ResidualQuantizer(nn.Module):
    def __init__(self, vocab_size: int, channels: int, scales: tuple, *, share_quant_resi: int = 4,
                 quant_resi: float = 0.5, beta: float = 0.25):
        super().__init__()
        self.vocab_size, self.channels, self.scales, self.beta = vocab_size, channels, tuple(scales), beta
        self.embedding = nn.Embedding(vocab_size, channels)
        self.quant_resi = make_phis(share_quant_resi, len(self.scales), channels, quant_resi)
        # Per-scale EMA of code hits (VAR keeps it in the checkpoint): a usage monitor only.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.scales), vocab_size))

    # ----- the per-scale pieces ------------------------------------------------------------
    @property
    def latent_size(self) -> int:
        return self.scales[-1]

    def phi_index(self, k: int) -> int:
        last = len(self.scales) - 1
        return self.quant_resi.index_for(k / last if last else 0.0)

    def phi(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return self.quant_resi.conv(self.phi_index(k))(h)

    def downsample(self, k: int, f: torch.Tensor) -> torch.Tensor:
        """Area-downsample a full-size latent to scale k's side (identity at the last scale)."""
        if k == len(self.scales) - 1:
            return f
        return F.interpolate(f, size=(self.scales[k], self.scales[k]), mode="area")

    def upsample(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Bicubic-upsample scale k's code map to the latent size (identity at the last scale)."""
        if k == len(self.scales) - 1:
            return h
        n = self.latent_size
        return F.interpolate(h, size=(n, n), mode="bicubic")

    def contribution(self, k: int, h_small: torch.Tensor) -> torch.Tensor:
        """h_k = φ_k(upsample(code map)): what scale k adds to f̂."""
        return self.phi(k, self.upsample(k, h_small))

    def nearest_code(self, z: torch.Tensor) -> torch.Tensor:
        """Eq. 3: index of the nearest codebook row (L2) for each row of z (N, C).

        ‖z‖² + ‖e‖² − 2 z·e in one addmm, in float32, the same arithmetic VAR uses, so that
        indices of real checkpoints match bit for bit."""
        codes = self.embedding.weight.detach().float()
        z = z.detach().float()
        dist = z.square().sum(1, keepdim=True) + codes.square().sum(1)
        return torch.argmin(torch.addmm(dist, z, codes.T, beta=1, alpha=-2), dim=1)

    def code_map(self, k: int, idx: torch.Tensor) -> torch.Tensor:
        """Codebook lookup of scale k's indices (B, pn²) as a map (B, C, pn, pn)."""
        pn = self.scales[k]
        return self.embedding(idx).transpose(1, 2).reshape(idx.shape[0], self.channels, pn, pn)

    def _rows(self, z: torch.Tensor) -> torch.Tensor:
        return z.permute(0, 2, 3, 1).reshape(-1, self.channels)

    # ----- whole schedule --------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, f: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(indices per scale (B, pn²), cumulative f̂ after each scale) of a latent f."""
        with torch.autocast(f.device.type, enabled=False):
            rest = f.detach().float().clone()
            fhat = torch.zeros_like(rest)
            indices, fhats = [], []
            for k in range(len(self.scales)):
                idx = self.nearest_code(self._rows(self.downsample(k, rest))).view(f.shape[0], -1)
                h = self.contribution(k, self.code_map(k, idx))
                fhat = fhat + h
                rest = rest - h
                indices.append(idx)
                fhats.append(fhat)
        return indices, fhats

    def cumulative_fhats(self, indices: list[torch.Tensor]) -> list[torch.Tensor]:
        """f̂ after each scale, from token indices alone (the decoder side of Eq. 4)."""
        fhat, out = None, []
        for k, idx in enumerate(indices):
            h = self.contribution(k, self.code_map(k, idx).float())
            fhat = h if fhat is None else fhat + h
            out.append(fhat)
        return out

    def next_scale_input(self, k: int, fhat: torch.Tensor | None, h_small: torch.Tensor):
        """Add scale k's code map to f̂; return (f̂, input tokens of scale k+1 (B, pn², C) or None)."""
        h = self.contribution(k, h_small.float())
        fhat = h if fhat is None else fhat + h
        if k == len(self.scales) - 1:
            return fhat, None
        return fhat, self._tokens(self.downsample_to(self.scales[k + 1], fhat))

    def downsample_to(self, pn: int, f: torch.Tensor) -> torch.Tensor:
        return f if pn == f.shape[-1] else F.interpolate(f, size=(pn, pn), mode="area")

    @staticmethod
    def _tokens(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)  # (B, C, pn, pn) -> (B, pn², C), row-major

    def teacher_forcing_input(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """Inputs of scales 2..K: area-downsample of the running f̂ to each next scale
        (B, L − pn_1², C). Built by the very step sampling uses, so the two cannot differ."""
        fhat, inputs = None, []
        for k in range(len(self.scales) - 1):
            fhat, nxt = self.next_scale_input(k, fhat, self.code_map(k, indices[k]))
            inputs.append(nxt)
        return torch.cat(inputs, dim=1)

    # ----- training ----------------------------------------------------------------------------
    def forward(self, f: torch.Tensor, residual_sample: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Quantise for training: (f̂ with straight-through gradient, VQ loss, stats).

        The VQ loss averages over scales: mse(f̂_k, sg f) pulls the codebook and φ towards the
        latent (codebook loss), β·mse(sg f̂_k, f) pulls the encoder towards its codes
        (commitment). f̂ + (f − sg f) passes the decoder's gradient straight to the encoder.
        ``stats["hits"]`` is (K, V) code counts; ``stats["residuals"]`` holds up to
        ``residual_sample`` of the vectors that were quantised (for dead-code restarts)."""
        with torch.autocast(f.device.type, enabled=False):
            f = f.float()
            target = f.detach()
            rest, fhat = target.clone(), torch.zeros_like(target)
            loss = f.new_zeros(())
            hits, rows_seen = [], []
            for k in range(len(self.scales)):
                rows = self._rows(self.downsample(k, rest))
                idx = self.nearest_code(rows)
                hits.append(torch.bincount(idx, minlength=self.vocab_size).float())
                rows_seen.append(rows)
                h = self.contribution(k, self.code_map(k, idx.view(f.shape[0], -1)))
                fhat = fhat + h
                rest = rest - h.detach()
                loss = loss + F.mse_loss(fhat, target) + self.beta * F.mse_loss(fhat.detach(), f)
            loss = loss / len(self.scales)
            hits_kv = torch.stack(hits)
            if self.training:
                self.ema_vocab_hit_SV.mul_(0.99).add_(hits_kv, alpha=0.01)
            stats = {"hits": hits_kv}
            if residual_sample:
                pool = torch.cat(rows_seen)
                pick = torch.randint(0, pool.shape[0], (residual_sample,), device=pool.device)
                stats["residuals"] = pool[pick]
            return fhat.detach() + (f - target), loss, stats
