"""Which vision layers the encoder levels align with (g_m, paper §3.2 and Table 3), and checks
that the target tensors the loss needs are there.

The paper's maps are for CLIP ViT-L/14's 24 layers: "balanced" g_m = 8 + 4m → {12, 16, 20, 24}
(MindHier's choice), "early" g_m = 6m → {6, 12, 18, 24}, "late" g_m = 16 + 2m → {18, 20, 22, 24}.
For a backbone of another depth the vision package scales them (``scaled_layer_map``: each
layer keeps its relative depth). "default" is the backbone's own ``default_layers``.
"""

from __future__ import annotations

from mindhier.errors import MindhierError
from mindhier.vision import LAYER_MAPS, scaled_layer_map

LAYER_MAP_CHOICES = ("default", *LAYER_MAPS)


class MissingTargetsError(MindhierError, KeyError):
    """A target cache that lacks a layer (or the text tokens) the loss needs."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def layer_map(name: str, depth: int, default: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """g_1..g_M for map ``name`` on a vision model of ``depth`` layers (hidden_states[g]).
    "default" means ``default`` (the backbone's default_layers) or else the balanced map."""
    if name == "default":
        return tuple(int(g) for g in default) if default is not None else scaled_layer_map("balanced", depth)
    if name not in LAYER_MAPS:
        raise MindhierError(f"unknown layer map {name!r}; choose one of {list(LAYER_MAP_CHOICES)}")
    return scaled_layer_map(name, depth)


def required_keys(layers: tuple[int, ...], final_layer: int) -> list[str]:
    keys = sorted({f"layer_{g}" for g in (*layers, final_layer)}, key=lambda k: int(k.split("_")[1]))
    return keys + ["text"]


def check_cached_layers(cached: tuple[int, ...], layers: tuple[int, ...], final_layer: int, where: str) -> None:
    """Fail before training when the cache lacks a layer the loss needs."""
    missing = sorted((set(layers) | {final_layer}) - set(cached))
    if missing:
        raise MissingTargetsError(
            f"{where} holds vision targets for layers {sorted(cached)}, but this encoder aligns with "
            f"layers {list(layers)} and the final layer {final_layer}; missing {missing}. Rebuild the "
            f"target cache with those layers, or pick a layer map they cover."
        )


def check_batch_targets(targets: dict, layers: tuple[int, ...], final_layer: int, where: str) -> None:
    missing = [k for k in required_keys(layers, final_layer) if k not in targets]
    if missing:
        raise MissingTargetsError(
            f"{where} returned targets {sorted(targets)} without {missing}; the cache was built for "
            f"other layers: rebuild it for layers {list(layers)} + final {final_layer}"
        )
