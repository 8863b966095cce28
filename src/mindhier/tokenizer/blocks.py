"""Convolutional encoder and decoder of the VAR VQ-VAE (the taming-transformers lineage).

Module names (``down.{i}.block.{j}``, ``mid.attn_1``, ``up.{i}.upsample`` …) are part of the
checkpoint format: they are what VAR/Switti state dicts contain, so do not rename them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mindhier.tokenizer.config import VQVAEConfig


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    # eps 1e-6 as in VAR; affine weights are part of the state dict.
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


def conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1)


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1x1 shortcut when the width changes."""

    def __init__(self, c_in: int, c_out: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(c_in, groups)
        self.conv1 = conv3x3(c_in, c_out)
        self.norm2 = group_norm(c_out, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(c_out, c_out)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, kernel_size=1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions; q, k, v come from one 1x1 conv
    (channels [0:C] = q, [C:2C] = k, [2C:3C] = v), softmax scale C^-1/2, residual output."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, 1, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero row/column at the bottom/right (VAR)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid_block(channels: int, cfg: VQVAEConfig) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, cfg.norm_groups, cfg.dropout)
    mid.attn_1 = AttnBlock(channels, cfg.norm_groups) if cfg.use_attention else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels, cfg.norm_groups, cfg.dropout)
    return mid


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    # Attention (lowest level only) follows each ResnetBlock.
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    """Image (B,3,H,W) in [-1,1] -> latent (B,Cvae,H/d,W/d), d = 2^(levels-1)."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        levels = len(cfg.ch_mult)
        self.conv_in = conv3x3(3, cfg.ch)
        self.down = nn.ModuleList()
        c_in = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            c_out = cfg.ch * mult
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(c_in, c_out, cfg.norm_groups, cfg.dropout))
                c_in = c_out
                if i == levels - 1 and cfg.use_attention:
                    level.attn.append(AttnBlock(c_in, cfg.norm_groups))
            if i != levels - 1:
                level.downsample = Downsample(c_in)
            self.down.append(level)
        self.mid = _mid_block(c_in, cfg)
        self.norm_out = group_norm(c_in, cfg.norm_groups)
        self.conv_out = conv3x3(c_in, cfg.z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B,Cvae,h,w) -> image (B,3,h·d,w·d) (unclamped); ``up[i]`` mirrors ``down[i]``
    with one more ResnetBlock per level."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        levels = len(cfg.ch_mult)
        c_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = conv3x3(cfg.z_channels, c_in)
        self.mid = _mid_block(c_in, cfg)
        ups: list[nn.Module] = []
        for i in reversed(range(levels)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            c_out = cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(c_in, c_out, cfg.norm_groups, cfg.dropout))
                c_in = c_out
                if i == levels - 1 and cfg.use_attention:
                    level.attn.append(AttnBlock(c_in, cfg.norm_groups))
            if i != 0:
                level.upsample = Upsample(c_in)
            ups.insert(0, level)
        self.up = nn.ModuleList(ups)
        self.norm_out = group_norm(c_in, cfg.norm_groups)
        self.conv_out = conv3x3(c_in, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
