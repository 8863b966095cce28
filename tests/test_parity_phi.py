"""Parity with VAR's φ sharing (quant.py: PhiShared, PhiPartiallyShared, PhiNonShared).

VAR places n shared φ at ticks linspace(1/3n, 1 − 1/3n, n) when n == 4 and linspace(1/2n,
1 − 1/2n, n) otherwise; scale k of K takes the φ whose tick is nearest to k/(K−1). The expected
tables below are written out by hand from that rule (ties resolve to the first φ, as numpy's
argmin does in VAR).
"""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mindhier.config import ConfigError
from mindhier.tokenizer import PRESETS, MultiScaleVQVAE, VQVAEConfig
from mindhier.tokenizer.quant import ResidualQuantizer, phi_table, phi_ticks

TABLES = [
    # (share_quant_resi, scales K, conv per scale)
    (4, 10, [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]),  # VAR / Switti default
    (3, 10, [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]),  # halves ticks; k = 3 and 6 are exact ties
    (2, 10, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]),
    (5, 10, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]),
    (1, 10, [0] * 10),  # PhiShared
    (0, 10, list(range(10))),  # PhiNonShared: one φ per scale
    (4, 6, [0, 0, 1, 2, 3, 3]),  # the demo / foundation schedule
    (3, 6, [0, 0, 1, 1, 2, 2]),
    (0, 6, list(range(6))),
    (4, 4, [0, 1, 2, 3]),  # tiny
]


def test_tick_positions_are_vars():
    assert np.allclose(phi_ticks(4), [1 / 12, 1 / 12 + 5 / 18, 11 / 12 - 5 / 18, 11 / 12])
    assert np.allclose(phi_ticks(3), [1 / 6, 1 / 2, 5 / 6])
    assert np.allclose(phi_ticks(2), [1 / 4, 3 / 4])
    assert np.allclose(phi_ticks(1), [1 / 2])


@pytest.mark.parametrize("share,num_scales,expected", TABLES)
def test_phi_index_table(share, num_scales, expected):
    assert phi_table(share, num_scales) == expected
    quant = ResidualQuantizer(8, 4, tuple(range(1, num_scales + 1)), share_quant_resi=share)
    assert [quant.phi_index(k) for k in range(num_scales)] == expected


def test_released_schedules_keep_their_tables():
    """The 6-scale, 4-φ demo/foundation tokenizers map scales to convs exactly as before."""
    for name, expected in [("demo", [0, 0, 1, 2, 3, 3]), ("foundation", [0, 0, 1, 2, 3, 3]),
                           ("tiny", [0, 1, 2, 3]), ("paper", [0, 0, 1, 1, 1, 2, 2, 3, 3, 3])]:
        cfg = PRESETS[name]
        assert cfg.share_quant_resi == 4
        with torch.device("meta"):
            model = MultiScaleVQVAE(cfg)
        assert [model.phi_index(k) for k in range(len(cfg.scales))] == expected, name
        names = {k for k in model.state_dict() if k.startswith("quantize.quant_resi.")}
        assert names == {f"quantize.quant_resi.qresi_ls.{i}.{p}" for i in range(4) for p in ("weight", "bias")}


@pytest.mark.parametrize("share,keys", [
    (0, {f"quant_resi.{i}.{p}" for i in range(4) for p in ("weight", "bias")}),
    (1, {f"quant_resi.qresi.{p}" for p in ("weight", "bias")}),
    (3, {f"quant_resi.qresi_ls.{i}.{p}" for i in range(3) for p in ("weight", "bias")}),
])
def test_sharing_modes_have_vars_state_dict_names(share, keys):
    quant = ResidualQuantizer(8, 4, (1, 2, 3, 4), share_quant_resi=share)
    assert {k for k in quant.state_dict() if k.startswith("quant_resi.")} == keys


@pytest.mark.parametrize("share", [0, 1, 3])
def test_fhat_uses_the_tabled_conv_per_scale(share):
    """Independent f̂ = Σ_k φ_{table[k]}(bicubic(Z[r_k])) for every sharing mode."""
    torch.manual_seed(0)
    scales = (1, 2, 3, 4)
    quant = ResidualQuantizer(16, 4, scales, share_quant_resi=share)
    convs = list(quant.quant_resi.modules())
    convs = [m for m in convs if isinstance(m, torch.nn.Conv2d)]
    idx = [torch.randint(0, 16, (2, pn * pn)) for pn in scales]
    expected = 0
    with torch.no_grad():
        for k, (pn, r) in enumerate(zip(scales, idx)):
            h = quant.embedding.weight[r].reshape(2, pn, pn, -1).permute(0, 3, 1, 2)
            if pn != scales[-1]:
                h = F.interpolate(h, size=(scales[-1],) * 2, mode="bicubic")
            conv = convs[phi_table(share, len(scales))[k]]
            expected = expected + 0.5 * h + 0.5 * F.conv2d(h, conv.weight, conv.bias, padding=1)
        assert torch.allclose(quant.cumulative_fhats(idx)[-1], expected, atol=1e-5)


@pytest.mark.parametrize("share", [0, 1])
def test_tokenizer_round_trip_with_unshared_and_shared_phi(share):
    cfg = dataclasses.replace(PRESETS["tiny"], share_quant_resi=share)
    model = MultiScaleVQVAE(cfg).eval()
    x = MultiScaleVQVAE.images01_to_input(torch.rand(2, 3, cfg.image_size, cfg.image_size))
    with torch.no_grad():
        idx = model.img_to_indices(x)
        assert [i.shape[1] for i in idx] == [pn * pn for pn in cfg.scales]
        assert model.indices_to_img(idx).shape == x.shape


def test_negative_share_is_refused():
    with pytest.raises(ConfigError, match="share_quant_resi must be >= 0"):
        VQVAEConfig(share_quant_resi=-1)
