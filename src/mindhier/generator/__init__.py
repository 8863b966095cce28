"""Stage 2: the scale-aware coarse-to-fine generator (paper §3.3; SPEC §5).

Public API::

    from mindhier.generator import GeneratorConfig, PRESETS, ScaleAwareGenerator, Condition
    gen = ScaleAwareGenerator(PRESETS["tiny"])
    cond = gen.condition([e_1, ..., e_M])         # each (B, T, D) from the frozen encoder
    logits = gen(tf_input, cond=cond)              # teacher forcing, (B, L, V)
    cache = gen.cross_attn_cache(cond)             # once per image
    logits_k = gen.forward_scale(k, x_k, cond, cache)  # sampling, one scale (0-based k)
"""

from mindhier.generator.config import (
    PRESETS,
    ROUTINGS,
    SCHEDULE_512,
    GeneratorConfig,
    routing_table,
    seed_level,
)
from mindhier.generator.model import Condition, CrossAttnCache, GeneratorInputError, ScaleAwareGenerator
from mindhier.generator.switti_keys import (
    SWITTI_TO_MINDHIER,
    SwittiLoadReport,
    SwittiWeightsError,
    load_switti_weights,
    switti_key_to_ours,
)

__all__ = [
    "PRESETS", "ROUTINGS", "SCHEDULE_512", "GeneratorConfig", "routing_table", "seed_level",
    "Condition", "CrossAttnCache", "GeneratorInputError", "ScaleAwareGenerator",
    "SWITTI_TO_MINDHIER", "SwittiLoadReport", "SwittiWeightsError", "load_switti_weights",
    "switti_key_to_ours",
]
