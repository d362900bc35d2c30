"""``pcm-drift`` in mode ``aihwkit``: formulas of aihwkit's ``PCMLikeNoiseModel`` and
``GlobalDriftCompensation`` (IBM/aihwkit, src/aihwkit/inference/noise/pcm.py lines 132-158
``apply_drift_noise_to_conductance``; noise/base.py lines 100-127 ``apply_drift_noise``;
converter/conductance.py ``SinglePairConductanceConverter.convert_to_conductances``;
simulator/tiles/inference.py lines 219-266 ``drift_weights``; compensation/drift.py lines
27-30 ``readout``, compensation/base.py lines 55-61 ``apply``), checked on hand-computed
cases."""

from __future__ import annotations

import math

import pytest
import torch

from afm.analog.noise import PCMDeviceState, PCMDriftNoise, get_noise_model


def _state(g_plus, g_minus, nu_plus=0.05, nu_minus=0.05, amax=1.0):
    gp, gm = torch.tensor(g_plus), torch.tensor(g_minus)
    return PCMDeviceState(
        g_plus=gp,
        g_minus=gm,
        g_target_plus=gp.clone(),
        g_target_minus=gm.clone(),
        nu_plus=torch.full_like(gp, nu_plus),
        nu_minus=torch.full_like(gm, nu_minus),
        amax=torch.full((gp.shape[0], 1), amax),
    )


def test_read_noise_is_evaluated_at_t_plus_t0():
    # pcm.py:138 t = t_inference + t_0; 148-151 Q · sqrt(log((t + t_read) / (2 t_read)))
    g = torch.tensor([12.5])
    q = min(0.0088 / max((12.5 / 25) ** 0.65, 1e-3), 0.2)
    for t in (0.0, 3600.0):
        want = q * math.sqrt(math.log((t + 20.0 + 250e-9) / (2 * 250e-9)))
        got = PCMDriftNoise(mode="aihwkit").read_noise_sigma(g, t).item()
        assert got == pytest.approx(want, rel=1e-6)
    assert PCMDriftNoise().read_noise_sigma(g, 0.0).item() == 0.0  # afm mode: none at 0 s


def test_pair_is_rederived_from_the_programmed_net_weight():
    # net = [18, -5] µS, tile max 18: scale 25/18, one device per weight (conductance.py)
    nm = PCMDriftNoise(mode="aihwkit")
    g_plus, g_minus = nm.rederive_pair(_state([[20.0, 0.0]], [[2.0, 5.0]]))
    assert torch.allclose(g_plus, torch.tensor([[25.0, 0.0]]))
    assert torch.allclose(g_minus, torch.tensor([[0.0, 5 * 25 / 18]]))


def test_drift_of_the_rederived_pair_without_read_noise():
    # No read noise: g(t) = g' · ((t + t0) / t0)^-ν, then back by the pair's scale.
    nm = PCMDriftNoise(mode="aihwkit", read_noise_scale=0.0)
    state = _state([[20.0, 0.0]], [[2.0, 5.0]], nu_plus=0.06, nu_minus=0.1)
    t = 86400.0
    gp, gm = nm.conductances_at(state, t, torch.Generator().manual_seed(0))
    d_plus, d_minus = ((t + 20) / 20) ** -0.06, ((t + 20) / 20) ** -0.1
    assert torch.allclose(gp, torch.tensor([[18.0 * d_plus, 0.0]]), rtol=1e-5)
    assert torch.allclose(gm, torch.tensor([[0.0, 5.0 * d_minus]]), rtol=1e-5)
    # afm mode drifts the programmed devices themselves (g- = 2 of the first weight too)
    gp_afm, gm_afm = PCMDriftNoise(read_noise_scale=0.0).conductances_at(
        state, t, torch.Generator().manual_seed(0)
    )
    assert torch.allclose(gm_afm[0, 0], torch.tensor(2.0 * d_minus), rtol=1e-5)


def test_periphery_readout_per_tile_through_an_8_bit_adc():
    # Identity probe: outputs are the weights in units of the channel range, g/g_max.
    # Tile 0 holds [1, -0.5]: ADC step 24/254, round(10.58) = 11, round(5.29) = 5 steps.
    nm = PCMDriftNoise(mode="aihwkit", tile_size=2, readout_bits=8, readout_bound=12.0)
    g = torch.tensor([[25.0, -12.5, 2.5, 0.0]])
    read = nm.periphery_readout(g, torch.Generator().manual_seed(0))
    step = 24 / 254
    tile0 = (11 * step + 5 * step) / 2
    tile1 = max(round(0.1 / step) * step / 2, 1e-4)  # [0.1, 0] -> 1 step, 0
    assert torch.allclose(read, torch.tensor([[tile0, tile0, tile1, tile1]]), rtol=1e-6)
    ideal = PCMDriftNoise(mode="aihwkit", tile_size=2).periphery_readout(g, None)
    assert torch.allclose(ideal, torch.tensor([[0.75, 0.75, 0.05, 0.05]]))


def test_compensation_is_one_factor_per_tile():
    # Compensated weights of each tile have the programmed chip's mean |read-out|.
    torch.manual_seed(0)
    w = torch.randn(16, 8)
    nm = PCMDriftNoise(mode="aihwkit", t_inference=3.15e7, tile_size=4, scale=0.0)
    out = nm.perturb_weight(w, torch.Generator().manual_seed(1))
    amax = torch.cat([w[:, :4].abs().amax(1, keepdim=True).expand(-1, 4),
                      w[:, 4:].abs().amax(1, keepdim=True).expand(-1, 4)], dim=1)  # fmt: skip
    for lo in (0, 4):
        assert (out[:, lo : lo + 4] / amax[:, lo : lo + 4]).abs().mean().item() == pytest.approx(
            (w[:, lo : lo + 4] / amax[:, lo : lo + 4]).abs().mean().item(), rel=1e-5
        )


def test_aihwkit_mode_is_seeded_and_validated():
    w = torch.randn(8, 8)
    nm = get_noise_model("pcm-drift", mode="aihwkit", t_inference="1d", readout_noise=0.04)
    a = nm.perturb_weight(w, torch.Generator().manual_seed(3))
    b = nm.perturb_weight(w, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="mode"):
        PCMDriftNoise(mode="lightning")
    with pytest.raises(ValueError, match="aihwkit"):
        PCMDriftNoise(readout_bits=8)  # a periphery read-out is aihwkit's
    with pytest.raises(ValueError, match="readout_bits"):
        PCMDriftNoise(mode="aihwkit", readout_bits=1)
    assert PCMDriftNoise.from_dict(nm.to_dict()) == nm


def test_aihwkit_mode_error_at_0s_includes_read_noise():
    # At 0 s afm has programming noise only; aihwkit adds the read noise at t0 on top.
    torch.manual_seed(0)
    w = torch.randn(256, 256)
    err = {}
    for mode in ("afm", "aihwkit"):
        nm = PCMDriftNoise(mode=mode, per_channel=True)
        out = nm.perturb_weight(w, torch.Generator().manual_seed(0))
        err[mode] = ((out - w) / w.abs().amax(1, keepdim=True)).std().item()
    assert err["aihwkit"] > err["afm"] * 1.05
