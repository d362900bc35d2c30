"""The papers' chips, exactly (issue 17): the ahwa-lora preset is the AHWA-LoRA code's
chip, and each mechanism it needs is checked against a hand-computed case.

Sources: chenlicodebank/lora_on_analog_hardware lora_training/run_qa.py (gen_rpu_config);
aihwkit src/aihwkit/simulator/tiles/analog_mvm.py (bound management, lines 118-167 and
250-275) and torch_tile.py (ADD_NORMAL weight modifier, lines 237-252).
"""

from __future__ import annotations

import math

import pytest
import torch

import afm
from afm import reference
from afm.analog.noise import get_noise_model
from afm.bound_management import bound_management_limit
from afm.config import (
    AnalogConfig,
    Backend,
    BoundManagement,
    ClipConfig,
    ClipKind,
    InputQuantConfig,
    OutputNoiseConfig,
    OutputQuantConfig,
    WeightNoiseKind,
)
from afm.kernels import dispatch
from afm.presets import PRESETS, analog_head_of, eval_noise_of

N_IN = 254  # 8-bit DAC: 2^8 - 2 steps


def _dynamic(bound: float, bm: str = "iterative", **out: object) -> AnalogConfig:
    """8-bit dynamic inputs, 8-bit ADC with ``bound`` per channel, no noise."""
    return AnalogConfig(
        input=InputQuantConfig(bits=8, learn_ranges=False, dynamic=True),
        output=OutputQuantConfig(bits=8, bound=bound, per_channel=True, bound_management=bm, **out),
        clip=ClipConfig(ClipKind.NONE),
    )


def _run(x, w, cfg, backend=Backend.TORCH, training=False):
    r = torch.ones(cfg.num_tiles(w.shape[1]))
    return dispatch.analog_linear(x, w, None, r, cfg, training=training, seed=0, backend=backend)


# --------------------------------------------------------------------------- the preset
def test_ahwa_lora_preset_is_the_chip_of_the_ahwa_lora_code():
    chip = PRESETS["ahwa-lora"].config
    # inputs: 8-bit DAC, per-token abs-max (noise management ABS_MAX), no learned ranges
    assert chip.input.bits == 8 and chip.input.dynamic and not chip.input.uses_range
    # outputs: 8-bit ADC, IOParameters' out_bound 12 with ITERATIVE bound management,
    # per column (weights mapped column-wise, weight_scaling_columnwise=True)
    assert chip.output.bits == 8 and chip.output.bound == 12.0
    assert chip.output.bound_management is BoundManagement.ITERATIVE
    assert reference.adc_per_channel(chip)
    # weight noise ADD_NORMAL 0.067 of the column-normalised tile max = per channel
    assert chip.weight_noise.kind is WeightNoiseKind.ADD_GAUSS_PER_CHANNEL
    assert chip.weight_noise.std == 0.067
    # output noise 0.04 per channel and token, kept at inference
    assert chip.output_noise.std == 0.04 and chip.output_noise.per_channel
    assert reference.noise_in_mode(chip, training=False) == (False, True)
    # clipping layer-Gaussian 3σ, tiles of 512 inputs
    assert chip.clip.kind is ClipKind.GAUSSIAN and chip.clip.sigma == 3.0
    assert chip.max_input_size == 512
    assert analog_head_of("ahwa-lora")  # every linear layer, the task head included


def test_ahwa_lora_evaluation_noise_is_aihwkit_pcm_drift():
    noise = eval_noise_of("ahwa-lora")
    assert noise["name"] == "pcm-drift" and noise["mode"] == "aihwkit"
    assert noise["g_max"] == 25.0 and noise["tile_size"] == 512
    preset = PRESETS["ahwa-lora"]
    assert preset.eval_drift_times == ("0s", "1h", "1d", "1w", "1mo", "1y", "10y")
    assert preset.eval_seeds == 10
    model = get_noise_model(**noise)
    assert model.compensation and model.readout_bits == 8 and model.readout_noise == 0.04


# --------------------------------------------------------------------------- bound management
def test_bound_management_limit_follows_aihwkit():
    # analog_mvm.py:122-125 and 156-162: stop once reduction > max_bm_factor or
    # reduction > max_bm_res / (inp_res · 2 · inp_bound) = 0.25 / (2/254) = 31.75
    assert bound_management_limit(PRESETS["ahwa-lora"].config) == pytest.approx(31.75)
    cfg = _dynamic(12.0, max_bm_factor=4)
    assert bound_management_limit(cfg) == 4.0


def test_iterative_bound_management_halves_the_inputs_until_nothing_saturates():
    # W = [1, 1], x = [1, 1]: r = 1, x_int = 127 each, y = 254 grid units = 2.0.
    # Bound 1.5 (B = 1.5·r·a = 1.5): round 1 saturates.  Round 2 (f = 2): unit = 4/254,
    # x_int = round(63.5) = 64 (half to even), y = 128 grid units; ADC step in grid units
    # = (2·1.5/254)·127 = 1.5, round(128/1.5) = 85 <= 127: passes.  Out = 85·1.5·4/254.
    x, w = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 1.0]])
    bm = _run(x, w, _dynamic(1.5))
    assert bm.item() == pytest.approx(85 * 1.5 * 4 / 254, rel=1e-6)
    clipped = _run(x, w, _dynamic(1.5, bm="none"))
    assert clipped.item() == pytest.approx(1.5, rel=1e-6)


def test_iterative_bound_management_stops_at_the_largest_reduction():
    # Bound 0.01: every round saturates; the last one tried is f = 32 > 31.75:
    # unit = 64/254, x_int = round(3.97) = 4, y = 8 grid units, step = 0.01·127·2/254 = 0.01
    # in physical units, clamped at 127 steps: out = 127 · 0.01 · (64/254) · (254/2) / 127...
    # i.e. the bound of that round, B·f = 0.01 · 32.
    x, w = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 1.0]])
    assert _run(x, w, _dynamic(0.01)).item() == pytest.approx(0.32, rel=1e-6)
    assert _run(x, w, _dynamic(0.01, bm="none")).item() == pytest.approx(0.01, rel=1e-6)


def test_bound_management_is_per_token():
    # Token 0 saturates (as above), token 1 (x = [0.1, 0]) does not: it keeps round 1.
    x = torch.tensor([[1.0, 1.0], [0.1, 0.0]])
    w = torch.tensor([[1.0, 1.0]])
    bm, plain = _run(x, w, _dynamic(1.5)), _run(x, w, _dynamic(1.5, bm="none"))
    assert bm[0].item() == pytest.approx(85 * 1.5 * 4 / 254, rel=1e-6)
    assert bm[1].item() == plain[1].item()


def test_bound_management_gradient_is_straight_through_where_it_rescued_the_output():
    x = torch.tensor([[1.0, 1.0]], requires_grad=True)
    w = torch.tensor([[1.0, 1.0]], requires_grad=True)
    _run(x, w, _dynamic(1.5)).sum().backward()  # rescued at f = 2: straight through
    assert torch.allclose(x.grad, torch.tensor([[1.0, 1.0]]))
    x.grad = None
    _run(x, w, _dynamic(1.5, bm="none")).sum().backward()  # saturated: no gradient
    assert torch.count_nonzero(x.grad) == 0


def test_bound_management_tiles_are_independent():
    # Two tiles of 2 inputs: tile 0 saturates and is re-run, tile 1 is untouched.
    cfg = AnalogConfig(
        input=InputQuantConfig(bits=8, learn_ranges=False, dynamic=True),
        output=OutputQuantConfig(bits=8, bound=1.5, per_channel=True, bound_management="iterative"),
        clip=ClipConfig(ClipKind.NONE),
        max_input_size=2,
    )
    x = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # tile 1: r = 1, y = 127 grid units -> round(127/1.5) = 85 steps -> 85·1.5·2/254
    expected = 85 * 1.5 * 4 / 254 + 85 * 1.5 * 2 / 254
    assert _run(x, w, cfg).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.skipif(not dispatch.numba_available(), reason="numba is not installed")
def test_bound_management_on_the_numba_backend_matches_torch():
    torch.manual_seed(0)
    x, w = torch.randn(64, 96), torch.randn(24, 96)
    cfg = PRESETS["ahwa-lora"].config.replace(max_input_size=32)
    got = _run(x, w, cfg, backend=Backend.NUMBA)
    want = _run(x, w, cfg, backend=Backend.TORCH)
    assert torch.equal(got, want)


def test_triton_refuses_bound_management_and_auto_picks_torch(monkeypatch):
    cfg = PRESETS["ahwa-lora"].config
    with pytest.raises(RuntimeError, match="bound_management"):
        dispatch.resolve_backend(Backend.TRITON, torch.device("cuda"), cfg)
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert dispatch.resolve_backend(Backend.AUTO, torch.device("cuda"), cfg) is Backend.TORCH
    afm_paper = PRESETS["afm-paper"].config
    assert dispatch.resolve_backend(Backend.AUTO, torch.device("cuda"), afm_paper) is Backend.TRITON


def test_bound_management_needs_dynamic_inputs():
    with pytest.raises(ValueError, match="input.dynamic"):
        AnalogConfig(output=OutputQuantConfig(bits=8, bound=12.0, bound_management="iterative"))
    with pytest.raises(ValueError, match="bound_management"):
        OutputQuantConfig(bits=None, bound=None, bound_management="iterative")


def test_new_fields_round_trip_through_json():
    chip = PRESETS["ahwa-lora"].config
    assert AnalogConfig.from_dict(chip.to_dict()) == chip
    assert chip.to_dict()["output"]["bound_management"] == "iterative"


# --------------------------------------------------------------------------- output noise
def test_output_noise_at_inference_per_channel_and_token():
    # keep_at_eval: the eval forward is noisy.  Noise std = σ_o · r · a[i] per channel
    # (r the token's abs-max, a[i] the row's max|W|); no ADC, so the noise is exact.
    torch.manual_seed(0)
    cfg = AnalogConfig(
        input=InputQuantConfig(bits=8, learn_ranges=False, dynamic=True),
        output=OutputQuantConfig(bits=None, bound=None),
        output_noise=OutputNoiseConfig(std=0.04, per_channel=True, keep_at_eval=True),
        clip=ClipConfig(ClipKind.NONE),
    )
    w = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    x = torch.tensor([[2.0, 0.0]]).repeat(20000, 1)  # r = 2
    layer = afm.AnalogLinear(2, 2, bias=False, config=cfg)
    with torch.no_grad():
        layer.weight.copy_(w)
    layer.eval()
    with torch.no_grad():
        y = layer(x)
    clean = x @ w.t()
    std = (y - clean).std(dim=0)
    assert std[0].item() == pytest.approx(0.04 * 2 * 1, rel=0.03)
    assert std[1].item() == pytest.approx(0.04 * 2 * 4, rel=0.03)
    off = cfg.replace(output_noise=OutputNoiseConfig(std=0.04))  # training only (afm-paper rule)
    assert reference.noise_in_mode(off, training=False) == (False, False)


# --------------------------------------------------------------------------- ADC per channel
def test_adc_bound_per_channel_with_layer_clipping():
    # Rows with max|W| 1 and 0.1; x = [1, 1] (r = 1), bound 1: per channel the small row
    # gets B = 0.1, per tile B = 1.  y = [2, 0.2] saturate at [1, 0.1] (per channel).
    base = dict(
        input=InputQuantConfig(bits=8, learn_ranges=False, dynamic=True),
        clip=ClipConfig(ClipKind.GAUSSIAN, sigma=3.0),
    )
    per_ch = AnalogConfig(output=OutputQuantConfig(bits=8, bound=1.0, per_channel=True), **base)
    per_tile = AnalogConfig(output=OutputQuantConfig(bits=8, bound=1.0), **base)
    assert reference.adc_per_channel(per_ch) and not reference.adc_per_channel(per_tile)
    x = torch.tensor([[1.0, 1.0]])
    w = torch.tensor([[1.0, 1.0], [0.1, 0.1]])
    assert torch.allclose(_run(x, w, per_ch), torch.tensor([[1.0, 0.1]]), rtol=1e-6)
    # per tile: 0.2 in steps of 2/254 -> round(25.4) = 25 steps
    assert torch.allclose(_run(x, w, per_tile), torch.tensor([[1.0, 25 * 2 / 254]]), rtol=1e-6)


# --------------------------------------------------------------------------- weight noise
def test_add_normal_on_column_normalised_weights_is_per_channel_noise():
    # aihwkit torch_tile.py:237-252: W_n + std·max|W_n|·ξ on the tile's weights mapped
    # column-wise to max 1 (max|W_n| = 1), scaled back by the column's a: W + std·a·ξ.
    torch.manual_seed(1)
    w = torch.randn(6, 10) * torch.tensor([[0.1], [1.0], [3.0], [0.5], [2.0], [0.01]])
    bounds = reference.tile_bounds(10, 5)
    a = reference.weight_abs_max(w, bounds)
    gen = torch.Generator().manual_seed(7)
    ours = reference.noisy_weight(w, a, bounds, WeightNoiseKind.ADD_GAUSS_PER_CHANNEL, 0.067, gen)
    xi = torch.randn(w.shape, generator=torch.Generator().manual_seed(7))
    theirs = torch.empty_like(w)
    for s, (lo, hi) in enumerate(bounds):
        scale = a[s].unsqueeze(1)  # the column-wise mapping of tile s
        w_n = w[:, lo:hi] / scale
        assert w_n.abs().max().item() == pytest.approx(1.0)
        noisy_n = w_n + 0.067 * w_n.abs().max() * xi[:, lo:hi]
        theirs[:, lo:hi] = noisy_n * scale
    assert torch.allclose(ours, theirs, atol=1e-6)
    # The old ahwa-lora rule (the tile's max of the raw weights) is larger for small rows.
    tile = reference.noisy_weight(
        w, a, bounds, WeightNoiseKind.ADD_GAUSS, 0.067, torch.Generator().manual_seed(7)
    )
    assert not torch.allclose(tile, theirs, atol=1e-3)
    assert math.isclose((ours - w)[5].abs().max().item(), (theirs - w)[5].abs().max().item())


def _triton():
    pytest.importorskip("triton")
    if not dispatch.triton_available():
        pytest.skip("the Triton kernels do not import here")
    from afm.triton_kernels.analog_linear import triton_analog_linear

    return triton_analog_linear


def test_triton_launcher_refuses_bound_management():
    run = _triton()
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with pytest.raises(NotImplementedError, match="bound_management"):
        run(x, w, None, torch.ones(1), PRESETS["ahwa-lora"].config, training=False)


def test_triton_keeps_output_noise_at_inference_per_channel():
    run = _triton()
    cfg = PRESETS["ahwa-lora"].config.replace(
        output=OutputQuantConfig(bits=None, bound=None), max_input_size=None
    )
    w = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    x = torch.tensor([[2.0, 0.0]]).repeat(4096, 1)
    y = run(x, w, None, torch.ones(1), cfg.replace(weight_noise=cfg.weight_noise.__class__()),
            training=False, seed=3)  # fmt: skip
    std = (y - x @ w.t()).std(dim=0)
    assert std[0].item() == pytest.approx(0.04 * 2 * 1, rel=0.06)
    assert std[1].item() == pytest.approx(0.04 * 2 * 4, rel=0.06)


def test_dynamic_inputs_on_a_batch_the_cpu_chains_split_into_row_blocks():
    # M·N > 2^16: the torch chains run the ADC block by block; each token keeps its own
    # input step (a shape error before issue 17).  Same as running the tokens in slices.
    torch.manual_seed(0)
    x, w = torch.randn(300, 64), torch.randn(256, 64)
    cfg = PRESETS["ahwa-lora"].config.replace(output_noise=OutputNoiseConfig())  # deterministic
    whole = _run(x, w, cfg)
    sliced = torch.cat([_run(x[i : i + 50], w, cfg) for i in range(0, 300, 50)])
    assert torch.equal(whole, sliced)


def test_triton_follows_the_per_channel_adc_of_ahwa_lora():
    # ahwa-lora without bound management and noise: dynamic inputs, per-channel ADC
    # bound 12 with layer clipping; the kernel matches the reference to fp32 rounding.
    run = _triton()
    torch.manual_seed(0)
    cfg = PRESETS["ahwa-lora"].config.replace(
        output=OutputQuantConfig(bits=8, bound=2.0, per_channel=True),
        output_noise=OutputNoiseConfig(),
        max_input_size=48,
    )
    x, w = torch.randn(16, 96), torch.randn(24, 96) * torch.linspace(0.05, 2, 24)[:, None]
    want = _run(x, w, cfg)
    got = run(x, w, None, torch.ones(2), cfg, training=False)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    tile_cfg = cfg.replace(output=OutputQuantConfig(bits=8, bound=2.0))
    per_tile = run(x, w, None, torch.ones(2), tile_cfg, training=False)
    assert not torch.allclose(per_tile, want, atol=1e-3)
