"""Which visual area each voxel belongs to, for ``mindhier interpret`` (paper appendix D, Fig. S1).

Two sources, each saying which labels it used:

* **the synthetic world**: every voxel's true area is saved with the world
  (``world/subjXX_roi.npy``: 0 early, 1 mid, 2 high; names in ``world/world.json``). For the
  "flattened cortex" picture the voxels' receptive fields are drawn again from the world's
  recorded config and seed (:func:`mindhier.world.cortex.build_cortex`), and the redrawn areas
  must equal the saved ones, else the world was written by another version and no layout is made.
* **NSD**: a label volume of the subject in func1pt8mm space (``prf-visualrois.nii.gz`` or
  ``streams.nii.gz`` from ``nsddata/ppdata/subjXX/func1pt8mm/roi/``) read at the voxels of the
  nsdgeneral mask, in the order ``prepare-nsd`` wrote the betas (the mask's voxels in C order,
  :func:`mindhier.data.prepare_nsd.load_mask`). Label names and their order along the visual
  hierarchy are those of the NSD data manual (ROIs section); voxels outside every label are kept
  per voxel but left out of the per-area tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mindhier.data import layout
from mindhier.errors import MindhierError


class AreaError(MindhierError, ValueError):
    """Area labels that cannot be matched to the subject's voxels."""


@dataclass
class Areas:
    """label (V,) int: index into ``names`` (−1 = no area); ``rank``: each name's step along the
    visual hierarchy (early = 0); ``source``: what the labels were read from, in words."""

    label: np.ndarray
    names: list[str]
    rank: list[int]
    source: str

    def members(self, k: int) -> np.ndarray:
        return np.flatnonzero(self.label == k)


# NSD data manual, "ROIs": prf-visualrois (1 V1v, 2 V1d, 3 V2v, 4 V2d, 5 V3v, 6 V3d, 7 hV4) and
# streams (1 early, 2 midventral, 3 midlateral, 4 midparietal, 5 ventral, 6 lateral, 7 parietal).
# Ventral and dorsal halves are merged; the ranks order areas from early to high.
NSD_LABELS = {
    "prf-visualrois": ({1: "V1", 2: "V1", 3: "V2", 4: "V2", 5: "V3", 6: "V3", 7: "hV4"},
                       {"V1": 0, "V2": 1, "V3": 2, "hV4": 3}),
    "streams": ({1: "early", 2: "midventral", 3: "midlateral", 4: "midparietal", 5: "ventral",
                 6: "lateral", 7: "parietal"},
                {"early": 0, "midventral": 1, "midlateral": 1, "midparietal": 1,
                 "ventral": 2, "lateral": 2, "parietal": 2}),
}


def world_areas(root: Path, subject: int) -> Areas:
    """The world's saved area of every voxel of ``subject``."""
    path = Path(root) / "world" / f"{layout.subj_name(subject)}_roi.npy"
    info_path = Path(root) / "world" / "world.json"
    if not path.is_file() or not info_path.is_file():
        raise AreaError(f"{root} has no {path.name} / world.json: not a synthetic world; for NSD pass "
                        "--rois (a prf-visualrois or streams volume) and --nsdgeneral")
    label = np.load(path, allow_pickle=False).astype(np.int64)
    names = list(json.loads(info_path.read_text())["roi_names"])
    return Areas(label, names, list(range(len(names))), f"the world's saved areas ({path})")


def nsd_areas(rois: Path, nsdgeneral: Path, num_voxels: int, kind: str | None = None) -> Areas:
    """Areas of a prepared NSD subject's voxels from a label volume and the nsdgeneral mask."""
    import nibabel as nib

    from mindhier.data.prepare_nsd import load_mask

    kind = kind or next((k for k in NSD_LABELS if Path(rois).name.startswith(k)), None)
    if kind not in NSD_LABELS:
        raise AreaError(f"{rois}: cannot tell which NSD labels these are from the name; pass --roi-kind "
                        f"({' or '.join(NSD_LABELS)})")
    mask = load_mask(Path(nsdgeneral))
    if int(mask.sum()) != num_voxels:
        raise AreaError(f"{nsdgeneral} selects {int(mask.sum())} voxels but the betas have {num_voxels}: "
                        "use the nsdgeneral mask of the same subject the data was prepared from")
    volume = np.asarray(nib.load(str(rois)).dataobj)
    if volume.shape[:3] != mask.shape:
        raise AreaError(f"{rois} has shape {volume.shape}, the mask {mask.shape}: both must be the "
                        "subject's func1pt8mm volumes")
    values = np.rint(volume[mask]).astype(np.int64)  # C order: the order prepare-nsd wrote the voxels in
    by_value, ranks = NSD_LABELS[kind]
    names = sorted(ranks, key=lambda n: (ranks[n], n))
    label = np.array([names.index(by_value[v]) if v in by_value else -1 for v in values], dtype=np.int64)
    return Areas(label, names, [ranks[n] for n in names],
                 f"NSD {kind} labels ({rois}) inside nsdgeneral ({nsdgeneral}); "
                 f"{int((label < 0).sum())} of {num_voxels} voxels outside every label")


# ---------------------------------------------------------------- the world's "flattened cortex"

def world_layout(root: Path, subject: int, areas: Areas) -> tuple[np.ndarray, str] | None:
    """(V, 2) positions of every voxel for the best-block map, and how they were made; None when
    the receptive fields cannot be redrawn (another world version)."""
    from mindhier.config import from_dict
    from mindhier.world.config import WorldConfig
    from mindhier.world.cortex import build_cortex

    info = json.loads((Path(root) / "world" / "world.json").read_text())
    cfg = from_dict(WorldConfig, info["config"])
    cx = build_cortex(cfg, info["seed"], subject)
    if not np.array_equal(cx.roi.astype(np.int64), areas.label):
        return None
    xy = np.zeros((len(areas.label), 2))
    grid = cfg.feature_grid
    t = (np.arange(grid) + 0.5) / grid
    gx, gy = (g.reshape(-1) for g in np.meshgrid(t, t, indexing="xy"))
    for k, rf in ((0, cx.early_rf), (1, cx.mid_rf)):  # RF centre of mass, panel k
        idx = areas.members(k)
        xy[idx, 0] = k * 1.15 + gx @ rf
        xy[idx, 1] = 1 - gy @ rf  # image rows run down, the picture's y up
    high = areas.members(2)
    order = np.argsort(cx.high_category.argmax(axis=0), kind="stable")  # grouped by preferred category
    side = int(np.ceil(np.sqrt(len(high))))
    cells = np.arange(len(high))
    xy[high[order], 0] = 2 * 1.15 + ((cells % side) + 0.5) / side
    xy[high[order], 1] = 1 - ((cells // side) + 0.5) / side
    how = ("early and mid voxels at the centre of mass of their receptive field in the visual field "
           "(the world's retinotopy, redrawn from its config and seed); high voxels, which have no "
           "receptive field, on a grid grouped by their preferred category")
    return xy, how
