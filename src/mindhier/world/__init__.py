"""The synthetic world (SPEC §1.3): seeded images with captions, a simulated visual cortex for
NSD-numbered subjects, written in exactly NSD's MindEye2 layout so the real loaders read it.

    from mindhier.world import PRESETS, generate_world
    generate_world(PRESETS["demo"], "worlds/demo")

CLI: ``mindhier world --preset demo --out worlds/demo``; ``mindhier world --report worlds/demo``.
"""

from mindhier.world.config import PRESETS, CortexConfig, WorldConfig, world_preset
from mindhier.world.generate import WorldExistsError, generate_world, read_world_info

__all__ = ["PRESETS", "CortexConfig", "WorldConfig", "WorldExistsError", "generate_world", "read_world_info",
           "world_preset"]
