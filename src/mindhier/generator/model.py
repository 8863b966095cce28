"""The scale-aware coarse-to-fine generator (paper §3.3, Eq. 5, Fig. 2b; SPEC §5).

A Switti-style *non-autoregressive-within-scale* transformer over the token pyramid r_1 … r_K:
all tokens of one scale are predicted together from the upsampled sum of the previous scales
(teacher-forcing input), self-attention never crosses scales, and each scale cross-attends to the
fMRI context through a mask that implements the routing of :func:`routing_table`.

Two ways to run the same function:

* :meth:`ScaleAwareGenerator.forward` — teacher forcing, the whole pyramid at once (training);
* :meth:`ScaleAwareGenerator.forward_scale` — one scale at a time with the cross-attention K/V
  computed once per image (sampling). Because self-attention is same-scale only, it needs no
  self-attention KV cache, and scale k uses exactly the K/V columns its mask row allows.

``tests/test_generator.py`` checks that the two give the same logits under every routing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mindhier.errors import MindhierError
from mindhier.generator.blocks import (AdaLNHead, GeneratorBlock, context_plane_angles, image_plane_angles,
                                       init_generator_weights, rope_angles)
from mindhier.generator.config import GeneratorConfig, routing_table, seed_level


class GeneratorInputError(MindhierError, ValueError):
    """Inputs whose shapes do not fit the generator's config."""


@dataclass
class Condition:
    """What the generator is conditioned on, for a batch of B images.

    context: (B, Lctx, context_dim) — the fMRI tokens [e_M, …, e_1] (or any raw context);
    pooled: (B, pooled_dim) — the pooled vector that seeds the start token and drives AdaLN;
    context_levels: (Lctx,) long — which level m each context token comes from; None for an
    unlabelled raw context (only allowed with routing "none").
    """

    context: torch.Tensor
    pooled: torch.Tensor
    context_levels: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.context.shape[0]

    @staticmethod
    def cat(conds: list["Condition"]) -> "Condition":
        """Stack along the batch (e.g. [conditional; null] for classifier-free guidance)."""
        levels = conds[0].context_levels
        for c in conds[1:]:
            if (c.context_levels is None) != (levels is None) or (
                levels is not None and not torch.equal(c.context_levels, levels)
            ):
                raise GeneratorInputError("cannot batch conditions with different context layouts")
        return Condition(torch.cat([c.context for c in conds]), torch.cat([c.pooled for c in conds]), levels)

    def take(self, index) -> "Condition":
        """Rows ``index`` (a slice, list or tensor) of the batch."""
        return Condition(self.context[index], self.pooled[index], self.context_levels)


@dataclass
class CrossAttnCache:
    """Per-image quantities that do not change across scales: each layer's cross-attention K/V
    (B, H, Lctx, hd) and the projected condition vector (B, C)."""

    cond_vec: torch.Tensor
    keys_values: list[tuple[torch.Tensor, torch.Tensor]]

    def take(self, index) -> "CrossAttnCache":
        return CrossAttnCache(self.cond_vec[index], [(k[index], v[index]) for k, v in self.keys_values])


class ScaleAwareGenerator(nn.Module):
    """Stage-2 generator. Module names are our own; see ``switti_keys.py`` for the mapping from a
    released Switti checkpoint."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.width
        self.token_embed = nn.Linear(cfg.z_channels, C)      # VQ latent → model width
        self.cond_proj = nn.Linear(cfg.pooled_dim, C)        # pooled fMRI vector → start token / AdaLN
        self.start_pos = nn.Parameter(torch.zeros(1, cfg.first_len, C))
        self.scale_embed = nn.Embedding(cfg.num_scales, C)   # which scale a token belongs to
        self.blocks = nn.ModuleList(
            GeneratorBlock(C, cfg.num_heads, cfg.context_dim, cfg.ffn_hidden, cfg.norm_eps)
            for _ in range(cfg.depth)
        )
        self.head = AdaLNHead(C, cfg.vocab_size, cfg.norm_eps)
        # Activation checkpointing (a run setting, not part of the config: the function is the
        # same): teacher forcing keeps only each block's input and recomputes the block in the
        # backward pass, trading ~1/3 more compute for memory: at the paper's size (30 blocks,
        # L = 2240 tokens, width 1920) the activations of a per-GPU batch would otherwise dwarf
        # the weights and optimizer state (bench/device_check.py measures both settings).
        self.checkpoint_activations = False
        self._build_tables()
        self.init_weights()

    # -- fixed tables derived from the schedule (buffers, never stored in checkpoints) ----------
    def _build_tables(self) -> None:
        cfg = self.cfg
        scale_of_token = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(cfg.scales)])
        self.register_buffer("scale_of_token", scale_of_token, persistent=False)
        # RoPE tables stay float32 whatever the model is cast to (bf16 inference): kept per
        # device outside the buffers, so .to(dtype) never rounds the angles.
        head_dim = cfg.width // cfg.num_heads
        angles = rope_angles(cfg.scales, head_dim, cfg.rope_theta, cfg.rope_size)
        self._rope = {torch.device("cpu"): torch.polar(torch.ones_like(angles), angles)}
        self._cross_rope = {}
        if cfg.cross_rope:  # (queries, context keys) on the image plane
            tables = (image_plane_angles(cfg.scales, head_dim, cfg.rope_theta, cfg.rope_size),
                      context_plane_angles(cfg.context_grid, cfg.num_levels, head_dim, cfg.rope_theta, cfg.rope_size))
            self._cross_rope[torch.device("cpu")] = tuple(torch.polar(torch.ones_like(a), a) for a in tables)
        # Same-scale-only self-attention: block-diagonal (L, L), True = may attend.
        self.register_buffer("self_mask", scale_of_token[:, None] == scale_of_token[None, :], persistent=False)
        offsets = [0]
        for pn in cfg.scales:
            offsets.append(offsets[-1] + pn * pn)
        self.scale_offsets = tuple(offsets)

    def rope_table(self, device: torch.device) -> torch.Tensor:
        """exp(i·angle) of every token's RoPE angles, complex64 (L, head_dim/2), on ``device``."""
        device = torch.device(device)
        if device not in self._rope:
            self._rope[device] = self._rope[torch.device("cpu")].to(device)
        return self._rope[device]

    def cross_rope_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(queries (L, hd/2), context keys (Lctx, hd/2)) cross-attention RoPE tables on
        ``device``, or None when the config has no cross_rope."""
        if not self.cfg.cross_rope:
            return None
        device = torch.device(device)
        if device not in self._cross_rope:
            self._cross_rope[device] = tuple(t.to(device) for t in self._cross_rope[torch.device("cpu")])
        return self._cross_rope[device]

    def init_weights(self) -> None:
        std = math.sqrt(1 / (3 * self.cfg.width))
        init_generator_weights(self, self.blocks, self.head, self.cfg.width, std=std)
        nn.init.trunc_normal_(self.start_pos, std=std)

    def routing_table(self) -> tuple[int | None, ...]:
        """h_k per scale (see :func:`mindhier.generator.config.routing_table`)."""
        return routing_table(self.cfg)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- conditioning ---------------------------------------------------------------------------
    def condition(self, levels: list[torch.Tensor]) -> Condition:
        """Condition from the encoder's hierarchy [e_1, …, e_M], each (B, T, D).

        context = concat [e_M, …, e_1] along tokens (SPEC §5: the same order in training and
        sampling); pooled = mean over tokens of the seed level (e_M; e_1 when inverted)."""
        cfg = self.cfg
        if len(levels) != cfg.num_levels:
            raise GeneratorInputError(
                f"the generator expects M={cfg.num_levels} encoder levels e_1..e_M, got {len(levels)}; "
                f"use an encoder with as many levels or a generator config with num_levels={len(levels)}"
            )
        want = (cfg.tokens_per_level, cfg.context_dim)
        for m, e in enumerate(levels, start=1):
            if e.dim() != 3 or tuple(e.shape[1:]) != want:
                raise GeneratorInputError(
                    f"level e_{m} has shape {tuple(e.shape)}, expected (B, {want[0]}, {want[1]}) "
                    f"(tokens_per_level, context_dim of the generator config)"
                )
        if cfg.pooled_dim != cfg.context_dim:
            raise GeneratorInputError(
                f"pooled_dim {cfg.pooled_dim} ≠ context_dim {cfg.context_dim}: the pooled vector is the "
                f"mean of e_M's tokens, so both must equal the encoder's token width"
            )
        if cfg.level_norm:  # mean token norm 1 (all-zero levels, the pretraining null, stay zero)
            levels = [e * (e.shape[1] ** 0.5 / e.flatten(1).norm(dim=1).clamp_min(1e-6)).view(-1, 1, 1)
                      for e in levels]
        context = torch.cat(levels[::-1], dim=1)
        order = torch.arange(cfg.num_levels, 0, -1, device=context.device)
        context_levels = order.repeat_interleave(cfg.tokens_per_level)
        pooled = levels[seed_level(cfg) - 1].mean(dim=1)
        return Condition(context, pooled, context_levels)

    def cross_attn_cache(self, cond: Condition) -> CrossAttnCache:
        """Everything about the condition that sampling reuses at every scale: computed once."""
        self._check_condition(cond)
        context = cond.context.to(self.dtype)
        tables = self.cross_rope_tables(context.device)
        context_rotation = None if tables is None else tables[1]
        return CrossAttnCache(
            self.cond_proj(cond.pooled.to(self.dtype)),
            [block.cross_keys_values(context, context_rotation) for block in self.blocks],
        )

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype; inputs are cast to it (float32 unless the model was cast)."""
        return self.token_embed.weight.dtype

    def _check_condition(self, cond: Condition) -> None:
        cfg = self.cfg
        if cond.context.dim() != 3 or cond.context.shape[-1] != cfg.context_dim:
            raise GeneratorInputError(
                f"context has shape {tuple(cond.context.shape)}, expected (B, Lctx, {cfg.context_dim})")
        if tuple(cond.pooled.shape) != (cond.batch_size, cfg.pooled_dim):
            raise GeneratorInputError(
                f"pooled has shape {tuple(cond.pooled.shape)}, expected ({cond.batch_size}, {cfg.pooled_dim})")
        if cfg.cross_rope and cond.context.shape[1] != cfg.context_len:
            raise GeneratorInputError(
                f"context has {cond.context.shape[1]} tokens; cross_rope places {cfg.num_levels} levels of "
                f"{cfg.tokens_per_level} tokens ([CLS, {cfg.context_grid}×{cfg.context_grid} patches]) on the image")
        if cond.context_levels is None and cfg.routing != "none":
            raise GeneratorInputError(
                f"routing {cfg.routing!r} needs to know which level each context token comes from; "
                f"build the condition with generator.condition(levels)")

    # -- routing masks --------------------------------------------------------------------------
    def visible_context(self, si: int, cond: Condition) -> torch.Tensor | None:
        """Bool (Lctx,) of the context tokens scale ``si`` (0-based) may read; None = all."""
        h = self.routing_table()[si]
        if h is None:
            return None
        return cond.context_levels == h

    def cross_mask(self, cond: Condition) -> torch.Tensor | None:
        """Bool (L, Lctx) cross-attention mask of the whole pyramid: row i is the mask row of the
        scale token i belongs to (built from this model's schedule)."""
        if self.cfg.routing == "none":
            return None
        table = torch.tensor(self.routing_table(), device=cond.context.device)
        wanted = table[self.scale_of_token]                     # (L,) level each token reads
        return wanted[:, None] == cond.context_levels[None, :]

    # -- teacher forcing (training) -------------------------------------------------------------
    def embed(self, tf_input: torch.Tensor, cond_vec: torch.Tensor) -> torch.Tensor:
        """hidden_0 (B, L, C): start token (pooled → C, + start position) for scale 1, the
        embedded teacher-forcing input for scales 2..K, plus the scale embedding."""
        B = tf_input.shape[0]
        start = cond_vec[:, None, :] + self.start_pos.expand(B, -1, -1)
        x = torch.cat([start, self.token_embed(tf_input)], dim=1)
        return x + self.scale_embed(self.scale_of_token)[None]

    def _resolve(self, levels, cond) -> Condition:
        if (levels is None) == (cond is None):
            raise GeneratorInputError("pass exactly one of levels=[e_1..e_M] or cond=Condition")
        return self.condition(levels) if cond is None else cond

    def forward(self, tf_input: torch.Tensor, levels: list[torch.Tensor] | None = None, *,
                cond: Condition | None = None, return_hidden: bool = False):
        """Teacher-forced logits (B, L, V) for tf_input (B, L − pn₁², Cvae).

        With ``return_hidden`` also the list [hidden_0, after block 1, …, after block depth]."""
        cfg = self.cfg
        cond = self._resolve(levels, cond)
        self._check_condition(cond)
        expected = (cond.batch_size, cfg.seq_len - cfg.first_len, cfg.z_channels)
        if tuple(tf_input.shape) != expected:
            raise GeneratorInputError(
                f"teacher-forcing input has shape {tuple(tf_input.shape)}, expected {expected} "
                f"(B, L − pn₁², Cvae) for scales {cfg.scales}")
        context = cond.context.to(self.dtype)
        cond_vec = self.cond_proj(cond.pooled.to(self.dtype))
        x = self.embed(tf_input.to(self.dtype), cond_vec)
        cross_mask = self.cross_mask(cond)
        hidden = [x]
        rotation = self.rope_table(x.device)
        cross_rotation = self.cross_rope_tables(x.device)
        recompute = self.checkpoint_activations and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:   # the block is called inside, so FSDP2's hooks gather its weights again
                x = checkpoint(block, x, cond_vec, rotation, self.self_mask, cross_mask, context=context,
                               cross_rotation=cross_rotation, use_reentrant=False)
            else:
                x = block(x, cond_vec, rotation, self.self_mask, cross_mask, context=context,
                          cross_rotation=cross_rotation)
            hidden.append(x)
        logits = self.head(x, cond_vec)
        return (logits, hidden) if return_hidden else logits

    # -- one scale at a time (sampling) ---------------------------------------------------------
    def forward_scale(self, si: int, x_in: torch.Tensor | None, cond: Condition,
                      cache: CrossAttnCache | None = None) -> torch.Tensor:
        """Logits (B, pn², V) of scale ``si`` (0-based).

        ``x_in`` is None for the first scale (its input is the start token) and the VQ-latent
        input of the scale, (B, pn², Cvae), otherwise. ``cache`` from :meth:`cross_attn_cache`
        (computed here if not given). Only the context columns this scale's mask row allows
        are used, so the result equals the teacher-forced rows of this scale."""
        cfg = self.cfg
        cache = self.cross_attn_cache(cond) if cache is None else cache
        B = cache.cond_vec.shape[0]
        lo, hi = self.scale_offsets[si], self.scale_offsets[si + 1]
        if si == 0:
            x = cache.cond_vec[:, None, :] + self.start_pos.expand(B, -1, -1)
        else:
            if x_in is None or tuple(x_in.shape) != (B, hi - lo, cfg.z_channels):
                got = None if x_in is None else tuple(x_in.shape)
                raise GeneratorInputError(
                    f"scale {si} input has shape {got}, expected {(B, hi - lo, cfg.z_channels)}")
            x = self.token_embed(x_in.to(self.dtype))
        x = x + self.scale_embed.weight[si]
        rotation = self.rope_table(x.device)[lo:hi]
        tables = self.cross_rope_tables(x.device)   # the cached keys are rotated already
        cross_rotation = None if tables is None else (tables[0][lo:hi], None)
        visible = self.visible_context(si, cond)
        cols = None if visible is None else visible.nonzero().squeeze(1)
        for block, (k, v) in zip(self.blocks, cache.keys_values):
            kv = (k, v) if cols is None else (k[:, :, cols], v[:, :, cols])
            x = block(x, cache.cond_vec, rotation, None, None, cross_kv=kv, cross_rotation=cross_rotation)
        return self.head(x, cache.cond_vec)
