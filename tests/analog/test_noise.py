"""Tests for afm.analog.noise: deployment noise models (spec §5) and their model-level API."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from helpers import state_snapshot
from torch import nn

from afm.analog import noise as N

# §5a fits, written out independently of afm.analog.noise (c3, c2, c1, c0).
OD = (2.939751381126213e-05, -0.00371581208142707, 0.22419685954327148, 2.5797410660159494)
TD = (1.2329755395573392e-05, -0.003054993405157235, 0.2453487119885723, 2.110295720240385)


def p_of_g(g: float) -> float:
    c3, c2, c1, c0 = OD if abs(g) <= 52.5 else TD
    g = abs(g)
    return c3 * g**3 + c2 * g**2 + c1 * g + c0


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_llama_base():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied
    return model


@pytest.fixture
def llama(tiny_llama_base):
    return copy.deepcopy(tiny_llama_base)  # deepcopy keeps the tie


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


# --------------------------------------------------------------------------- tiles
def test_tile_bounds_balanced():
    assert N.tile_bounds(257, 128) == [(0, 86), (86, 172), (172, 257)]
    assert N.tile_bounds(256, 128) == [(0, 128), (128, 256)]
    assert N.tile_bounds(100, None) == [(0, 100)]
    assert N.tile_bounds(100, 512) == [(0, 100)]


# --------------------------------------------------------------------------- §5a PCM
def test_pcm_sigma_matches_polynomial_at_several_conductances():
    levels = torch.tensor([10.0, 40.0, 100.0, 170.0, 180.0])
    rows = 40000
    row_scale = torch.empty(rows, 1).uniform_(0.5, 2.0, generator=gen(1))
    sign = torch.where(torch.arange(rows) % 2 == 0, 1.0, -1.0).unsqueeze(1)
    w = levels / 180.0 * row_scale * sign  # every row's max maps to G = 180
    for scale in (1.0, 2.0):
        out = N.PCMProgrammingNoise(scale=scale).perturb_weight(w, gen(2))
        dg = (out - w) * 180.0 / row_scale  # G' - G (sign does not change the std)
        for j, level in enumerate(levels.tolist()):
            measured = dg[:, j].std().item()
            expected = scale * p_of_g(level)
            assert measured == pytest.approx(expected, rel=0.025), (level, scale)
            assert abs(dg[:, j].mean().item()) < 4 * expected / math.sqrt(rows)


def test_pcm_od_fit_below_52_5_and_td_fit_above():
    # The fits cross near 52.5; at these levels the wrong one is 3-5 % off.
    levels = [30.0, 45.0, 58.0, 65.0]
    rows = 80000
    w = torch.tensor(levels + [180.0]).repeat(rows, 1) / 180.0
    dg = (N.PCMProgrammingNoise().perturb_weight(w, gen(3)) - w) * 180.0
    for j, level in enumerate(levels):
        c3, c2, c1, c0 = OD if level <= 52.5 else TD
        expected = c3 * level**3 + c2 * level**2 + c1 * level + c0
        assert dg[:, j].std().item() == pytest.approx(expected, rel=0.012), level


def test_pcm_zeroes_unprogrammed_devices():
    g = torch.tensor([0.5, -0.5, 0.59, 0.7, -0.7, 0.0, 180.0])
    w = (g / 180.0).repeat(200, 1)
    w = torch.cat([w, torch.zeros(1, g.numel())])  # an all-zero row
    out = N.PCMProgrammingNoise().perturb_weight(w, gen(4))
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    assert torch.equal(out[:, 5], torch.zeros_like(out[:, 5]))
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))
    assert (out[:-1, 3:5] != 0).float().mean() > 0.99  # |G| >= 0.6 is programmed


def test_pcm_noise_is_per_tile():
    rows, k, m = 10000, 257, 128
    w = torch.zeros(rows, k)
    w[:, 0], w[:, 86], w[:, 172] = 1.0, 0.01, 0.1  # tile maxima 1, 0.01, 0.1
    w[:, 1] = w[:, 87] = w[:, 173] = 0.002  # G = 0.36 / 36 / 3.6 inside its tile
    out = N.PCMProgrammingNoise(tile_size=m).perturb_weight(w, gen(5))
    assert torch.equal(out[:, 1], torch.zeros(rows))  # G = 0.36 < 0.6
    for col, amax in ((87, 0.01), (173, 0.1)):
        g = 0.002 * 180.0 / amax
        measured = ((out[:, col] - w[:, col]) * 180.0 / amax).std().item()
        assert measured == pytest.approx(p_of_g(g), rel=0.03), col
    # One tile: everything is relative to the row max 1.0, so 0.002 -> G = 0.36 -> 0.
    out_row = N.PCMProgrammingNoise(tile_size=None).perturb_weight(w, gen(5))
    assert torch.equal(out_row[:, [1, 87, 173]], torch.zeros(rows, 3))
    assert (out_row[:, 86] != 0).all()  # G = 1.8 per row: programmed


def test_pcm_unprogrammed_cutoff_uses_per_tile_max_not_row_max():
    w = torch.zeros(500, 256)
    w[:, 0], w[:, 128] = 1.0, 0.01
    w[:, 129] = 0.004  # G = 72 in tile 2, G = 0.72 per row
    w[:, 130] = 0.003  # G = 54 in tile 2, G = 0.54 per row -> zero per row only
    tiled = N.PCMProgrammingNoise(tile_size=128).perturb_weight(w, gen(6))
    whole = N.PCMProgrammingNoise(tile_size=None).perturb_weight(w, gen(6))
    assert (tiled[:, 130] != 0).all()
    assert (whole[:, 130] == 0).all()
    assert (whole[:, 129] != 0).all()


# --------------------------------------------------------------------------- Gaussian
@pytest.mark.parametrize("std,scale", [(0.05, 1.0), (0.1, 3.0)])
def test_gaussian_std_relative_to_row_max(std, scale):
    rows = 4000
    amax = torch.logspace(-2, 1, rows).unsqueeze(1)
    w = torch.rand(rows, 64, generator=gen(7)) * amax
    w[:, 0] = amax[:, 0]
    out = N.GaussianWeightNoise(std=std, scale=scale).perturb_weight(w, gen(8))
    rel = (out - w) / amax
    assert rel.std().item() == pytest.approx(std * scale, rel=0.02)
    assert abs(rel.mean().item()) < 0.01 * std * scale


def test_gaussian_per_tile_and_per_layer_reference():
    w = torch.zeros(3000, 200)
    w[:, 0] = 1.0
    w[:, 100] = 0.1  # second tile's max
    w[0, 150] = 5.0  # the max of the second tile over all rows
    per_channel = N.GaussianWeightNoise(tile_size=100).perturb_weight(w, gen(9))
    per_tile = N.GaussianWeightNoise(tile_size=100, per_channel=False).perturb_weight(w, gen(9))
    d1 = per_channel[1:, 101:] - w[1:, 101:]
    d2 = per_tile[1:, 101:] - w[1:, 101:]
    assert d1.std().item() == pytest.approx(0.05 * 0.1, rel=0.03)
    assert d2.std().item() == pytest.approx(0.05 * 5.0, rel=0.03)


# --------------------------------------------------------------------------- purity, dtype
@pytest.mark.parametrize(
    "model",
    [N.PCMProgrammingNoise(), N.GaussianWeightNoise(), N.PCMDriftNoise(t_inference=3600.0)],
    ids=lambda m: m.name,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturb_weight_is_pure_and_keeps_dtype(model, dtype):
    w = torch.randn(16, 40, generator=gen(10)).to(dtype)
    before = w.clone()
    out = model.perturb_weight(w, gen(11))
    assert torch.equal(w, before)
    assert out.dtype == dtype and out.shape == w.shape
    assert not torch.equal(out, w)
    assert torch.equal(out, model.perturb_weight(w, gen(11)))  # same generator state
    assert not torch.equal(out, model.perturb_weight(w, gen(12)))


def test_perturb_weight_rejects_bad_weights():
    with pytest.raises(ValueError, match="2-D"):
        N.PCMProgrammingNoise().perturb_weight(torch.randn(3, 4, 5), gen())
    with pytest.raises(ValueError, match="floating"):
        N.GaussianWeightNoise().perturb_weight(torch.ones(3, 4, dtype=torch.int8), gen())


# --------------------------------------------------------------------------- §5b drift
def folded_normal(mu: float, sigma: float) -> tuple[float, float]:
    """Mean and std of |X|, X ~ N(mu, sigma)."""
    phi = 0.5 * (1 + math.erf(-mu / (sigma * math.sqrt(2))))
    mean = sigma * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / (2 * sigma**2)) + mu * (1 - 2 * phi)
    return mean, math.sqrt(mu**2 + sigma**2 - mean**2)


def nu_stats(g_rel: float) -> tuple[float, float]:
    lg = math.log(max(g_rel, 1e-7))
    mu = min(max(-0.0155 * lg + 0.0244, 0.049), 0.1)
    sigma = min(max(-0.0125 * lg - 0.0059, 0.008), 0.045)
    return folded_normal(mu, sigma)


def test_drift_exponent_statistics_match_formulas():
    levels = [1.0, 0.5, 0.1, 0.01]
    w = torch.tensor(levels).repeat(20000, 1)
    state = N.PCMDriftNoise().program(w, gen(13))
    for j, level in enumerate(levels):
        mean, std = nu_stats(level)
        nu = state.nu_plus[:, j]
        assert nu.mean().item() == pytest.approx(mean, rel=0.02), level
        assert nu.std().item() == pytest.approx(std, rel=0.04), level
    # the unused device of each pair is programmed to 0 (ĝ clamped at 1e-7)
    mean, std = nu_stats(0.0)
    assert state.nu_minus.mean().item() == pytest.approx(mean, rel=0.02)
    assert state.nu_minus.std().item() == pytest.approx(std, rel=0.04)
    assert (state.nu_plus >= 0).all()


def test_drift_programming_noise_matches_polynomial():
    levels = [1.0, 0.5, 0.2]
    w = torch.tensor(levels).repeat(20000, 1)
    state = N.PCMDriftNoise().program(w, gen(14))
    for j, level in enumerate(levels):
        sigma = 0.26348 + 1.9650 * level - 1.1731 * level**2
        dg = state.g_plus[:, j] - 25.0 * level
        assert dg.std().item() == pytest.approx(sigma, rel=0.03), level
    assert (state.g_minus >= 0).all() and (state.g_minus > 0).any()  # clamped at 0


def test_mean_conductance_decays_with_mean_drift_exponent():
    model = N.PCMDriftNoise(read_noise_scale=0.0)
    w = torch.full((200, 200), 0.5)
    w[:, 0] = 1.0
    state = model.program(w, gen(15))
    g_prog = state.g_plus[:, 1:]
    times = [N.DRIFT_TIMES[k] for k in ("1h", "1d", "1mo", "1y", "10y")]
    log_tau = torch.tensor([math.log((t + 20.0) / 20.0) for t in times])
    log_g = []
    for t in times:
        g_plus, _ = model.conductances_at(state, t, gen(16))
        log_g.append(math.log(g_plus[:, 1:].mean().item() / g_prog.mean().item()))
    log_g = torch.tensor(log_g)
    slope = ((log_tau - log_tau.mean()) * (log_g - log_g.mean())).sum() / (
        (log_tau - log_tau.mean()) ** 2
    ).sum()
    expected = -nu_stats(0.5)[0]
    assert slope.item() == pytest.approx(expected, rel=0.05)
    # absolute level: E[g(t)]/E[g_prog] = E[τ^-ν] with τ = (t + t0)/t0, t0 = 20 s
    mu, sigma = nu_stats(0.5)
    for lt, lg in zip(log_tau.tolist(), log_g.tolist(), strict=True):
        assert lg == pytest.approx(-mu * lt + 0.5 * sigma**2 * lt**2, rel=0.02), lt
    # a no-drift model does not decay
    flat = N.PCMDriftNoise(read_noise_scale=0.0, drift_scale=0.0)
    g_plus, _ = flat.conductances_at(flat.program(w, gen(15)), N.DRIFT_TIMES["10y"], gen(16))
    assert torch.equal(g_plus, flat.program(w, gen(15)).g_plus)


def test_read_noise_grows_with_time_and_matches_formula():
    model = N.PCMDriftNoise(drift_scale=0.0)  # isolate the read noise
    w = torch.full((300, 300), 0.5)
    w[:, 0] = 1.0
    state = model.program(w, gen(17))
    g_prog = state.g_plus[:, 1:]
    q = min(0.0088 / max((0.5) ** 0.65, 1e-3), 0.2)  # ĝ ≈ 0.5 (prog noise is small)
    stds = []
    for t in (1.0, 3600.0, N.DRIFT_TIMES["10y"]):
        g_t, _ = model.conductances_at(state, t, gen(18))
        rel = (g_t[:, 1:] - g_prog) / g_prog
        stds.append(rel.std().item())
        q_dev = (0.0088 / ((g_prog / 25.0) ** 0.65).clamp_min(1e-3)).clamp_max(0.2)
        expected = (q_dev**2).mean().sqrt().item() * math.sqrt(math.log((t + 250e-9) / 500e-9))
        assert stds[-1] == pytest.approx(expected, rel=0.03), t
        assert q_dev.mean().item() == pytest.approx(q, rel=0.05)
    assert stds[0] < stds[1] < stds[2]
    g0, m0 = model.conductances_at(state, 0.0, gen(18))  # no read noise at t = 0
    assert torch.equal(g0, state.g_plus) and torch.equal(m0, state.g_minus)


def test_drift_at_time_zero_is_the_programmed_chip():
    w = torch.randn(32, 64, generator=gen(19))
    state = N.PCMDriftNoise().program(w, gen(20))
    programmed = N.PCMDriftNoise().to_weight(state.g_plus, state.g_minus, state.amax)
    for comp in (True, False):
        out = N.PCMDriftNoise(t_inference=0.0, compensation=comp).perturb_weight(w, gen(20))
        assert torch.equal(out, programmed)
    assert not torch.equal(programmed, w)
    assert ((programmed - w).abs().mean() / w.abs().mean()).item() < 0.2


@pytest.mark.parametrize("probe", ["identity", "random"])
def test_drift_compensation_restores_mean_output_scale(probe):
    w = torch.randn(128, 256, generator=gen(21))
    x = torch.randn(512, 256, generator=gen(22))

    def mean_abs_y(**kw):
        out = N.PCMDriftNoise(probe=probe, **kw).perturb_weight(w, gen(23))
        return (x @ out.t()).abs().mean().item()

    y0 = mean_abs_y(t_inference=0.0)
    comp = mean_abs_y(t_inference="1y")
    raw = mean_abs_y(t_inference="1y", compensation=False)
    assert comp / y0 == pytest.approx(1.0, abs=0.03)
    assert raw / y0 < 0.75


# --------------------------------------------------------------------------- durations
def test_parse_duration_values():
    assert N.parse_duration("0s") == 0.0
    assert N.parse_duration("1h") == 3600.0
    assert N.parse_duration("1d") == 86400.0
    assert N.parse_duration("1w") == 7 * 86400.0
    assert N.parse_duration("1mo") == 30 * 86400.0
    assert N.parse_duration("1y") == 365 * 86400.0
    assert N.parse_duration("10y") == 3650 * 86400.0
    assert N.parse_duration("3600") == 3600.0
    assert N.parse_duration("90min") == 5400.0
    assert N.parse_duration(" 1.5 h ") == 5400.0
    assert N.parse_duration(12) == 12.0
    assert N.DRIFT_TIMES == {k: N.parse_duration(k) for k in N.DRIFT_TIMES}
    assert list(N.DRIFT_TIMES) == ["0s", "1h", "1d", "1w", "1mo", "1y", "10y"]
    assert N.format_duration(31536000.0) == "1y"
    assert N.PCMDriftNoise(t_inference="1y").t_inference == 31536000.0


@pytest.mark.parametrize("bad", ["abc", "-1h", "1m", "", "1hh", "h", "nan", "1e400", "1 y y"])
def test_parse_duration_errors_name_the_bad_string(bad):
    with pytest.raises(ValueError, match="invalid duration") as err:
        N.parse_duration(bad)
    assert repr(bad) in str(err.value)


def test_parse_duration_rejects_negative_numbers_and_bools():
    with pytest.raises(ValueError):
        N.parse_duration(-1.0)
    with pytest.raises(ValueError):
        N.parse_duration(True)
    with pytest.raises(ValueError, match="invalid duration"):
        N.PCMDriftNoise(t_inference="soon")


# --------------------------------------------------------------------------- registry
def test_registry_and_round_trip():
    assert set(N.NOISE_MODELS) == {"pcm", "gaussian", "pcm-drift"}
    m = N.get_noise_model("pcm", scale=2.0)
    assert m == N.PCMProgrammingNoise(scale=2.0, tile_size=512)
    for model in (m, N.GaussianWeightNoise(std=0.1), N.PCMDriftNoise(t_inference="1d")):
        d = model.to_dict()
        assert d["name"] == model.name
        assert N.noise_model_from_dict(d) == model
        assert type(model).from_dict(d) == model
    assert N.PCMDriftNoise(t_inference="1d").label == "pcm-drift(t_inference=86400.0)"
    assert N.PCMProgrammingNoise().label == "pcm"


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown noise model 'bogus'"):
        N.get_noise_model("bogus")
    with pytest.raises(ValueError, match="unknown options"):
        N.get_noise_model("pcm", sigma=1.0)
    with pytest.raises(ValueError, match="scale"):
        N.PCMProgrammingNoise(scale=-1.0)
    with pytest.raises(ValueError, match="tile_size"):
        N.PCMProgrammingNoise(tile_size=0)
    with pytest.raises(ValueError, match="probe"):
        N.PCMDriftNoise(probe="ones")
    with pytest.raises(ValueError, match="name"):
        N.noise_model_from_dict({"scale": 1.0})


# --------------------------------------------------------------------------- model level
def test_default_selection_is_every_linear_but_lm_head(llama, caplog):
    expected = [n for n in linear_names(llama) if n != "lm_head"]
    assert len(expected) == 14
    assert list(N.select_noise_layers(llama)) == expected
    before = state_snapshot(llama)
    with caplog.at_level(logging.INFO, logger="afm.analog.noise"):
        handle = N.apply_noise_(llama, N.PCMProgrammingNoise(), seed=0)
    assert "perturbed 14 layers" in caplog.text
    assert handle.layer_names == expected
    after = llama.state_dict()
    for name in expected:
        assert not torch.equal(after[name + ".weight"], before[name + ".weight"]), name
    for key in before:  # norms and embeddings (and the tied lm_head) untouched
        if not any(key == n + ".weight" for n in expected):
            assert torch.equal(after[key], before[key]), key


def test_same_seed_same_weights_and_selection_independent(tiny_llama_base):
    a, b, c, d = (copy.deepcopy(tiny_llama_base) for _ in range(4))
    noise = N.PCMProgrammingNoise()
    N.apply_noise_(a, noise, seed=1)
    N.apply_noise_(b, noise, seed=1)
    N.apply_noise_(c, noise, seed=2)
    N.apply_noise_(d, noise, seed=1, include=r"layers\.1\.")
    sa, sb, sc, sd = (state_snapshot(m) for m in (a, b, c, d))
    base = state_snapshot(tiny_llama_base)
    layer_keys = [k for k in sa if k.endswith("proj.weight")]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(not torch.equal(sa[k], sc[k]) for k in layer_keys)
    for k in layer_keys:
        if ".layers.1." in k:
            assert torch.equal(sd[k], sa[k]), k  # the same noise whatever else is selected
        else:
            assert torch.equal(sd[k], base[k]), k


def test_layer_seed_is_stable_and_name_dependent():
    assert N.layer_seed(0, "a") == N.layer_seed(0, "a")
    assert N.layer_seed(0, "a") != N.layer_seed(0, "b")
    assert N.layer_seed(0, "a") != N.layer_seed(1, "a")
    assert 0 <= N.layer_seed(123, "model.layers.0.mlp.up_proj") < 2**63


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_restore_is_bitwise(llama, dtype):
    llama.to(dtype)
    before = state_snapshot(llama)
    handle = N.apply_noise_(llama, N.PCMDriftNoise(t_inference="1y"), seed=3)
    assert any(not torch.equal(v, before[k]) for k, v in llama.state_dict().items())
    handle.restore()
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())
    handle.restore()  # idempotent
    assert handle.restored
    with N.apply_noise_(llama, N.GaussianWeightNoise(), seed=4):
        assert not torch.equal(
            llama.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"]
        )
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())


def test_restore_needs_originals(llama):
    handle = N.apply_noise_(llama, N.GaussianWeightNoise(), seed=0, keep_originals=False)
    with pytest.raises(RuntimeError, match="keep_originals"):
        handle.restore()


def test_tied_embedding_is_never_perturbed(llama):
    emb = llama.get_input_embeddings().weight
    emb_before = emb.detach().clone()
    handle = N.apply_noise_(llama, N.PCMProgrammingNoise(), seed=5, skip_lm_head=False)
    assert "lm_head" in handle.layer_names
    assert llama.get_input_embeddings().weight is emb
    assert torch.equal(emb, emb_before)
    assert llama.lm_head.weight is not emb  # untied while noisy
    assert not torch.equal(llama.lm_head.weight, emb_before)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(llama.get_input_embeddings()(ids), emb_before[ids])
    handle.restore()
    assert llama.lm_head.weight is emb  # tied again
    assert torch.equal(emb, emb_before)


def test_copy_variant_leaves_original_untouched(llama):
    before = state_snapshot(llama)
    noisy = N.apply_noise(llama, N.PCMProgrammingNoise(scale=2.0), seed=6)
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())
    N.apply_noise_(llama, N.PCMProgrammingNoise(scale=2.0), seed=6)
    assert all(torch.equal(v, llama.state_dict()[k]) for k, v in noisy.state_dict().items())
    assert noisy.lm_head.weight is noisy.get_input_embeddings().weight


def test_noisy_model_still_runs_and_differs(llama):
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        clean = llama(ids).logits
        with N.apply_noise_(llama, N.PCMProgrammingNoise(scale=3.0), seed=7):
            noisy = llama(ids).logits
        again = llama(ids).logits
    assert torch.isfinite(noisy).all()
    assert not torch.allclose(clean, noisy)
    assert torch.equal(clean, again)


def test_exclude_patterns(llama):
    sel = N.select_noise_layers(llama, exclude=["mlp"])
    assert sel and all("mlp" not in n for n in sel)
    assert list(N.select_noise_layers(llama, include="model.layers.0.mlp.up_proj")) == [
        "model.layers.0.mlp.up_proj"
    ]
    # issue 15: a pattern that selects nothing is an error, not a silent clean "noisy" model
    with pytest.raises(ValueError, match="'\\^nothing\\$' matches no linear layer"):
        N.apply_noise_(llama, N.PCMProgrammingNoise(), seed=0, include="^nothing$")


def test_gpt2_conv1d_is_perturbed_per_output_row():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=4)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    before = state_snapshot(model)
    noise = N.PCMProgrammingNoise(tile_size=None)
    handle = N.apply_noise_(model, noise, seed=8)
    convs = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    assert sorted(handle.layer_names) == sorted(convs) and len(convs) == 4
    for name in convs:
        w = before[name + ".weight"]  # [K, N_out]
        g = torch.Generator().manual_seed(N.layer_seed(8, name))
        expected = noise.perturb_weight(w.t(), g).t()
        assert torch.equal(model.get_submodule(name).weight, expected), name
    assert torch.equal(model.transformer.wte.weight, before["transformer.wte.weight"])


def test_only_analog_and_adapters_are_skipped():
    from afm.analog.layers import AnalogLinear
    from afm.presets import get_preset

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.base_layer = AnalogLinear.from_linear(nn.Linear(8, 8), get_preset("ideal"))
            self.lora_A = nn.ModuleDict({"default": nn.Linear(8, 2, bias=False)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(2, 8, bias=False)})

    model = nn.Module()
    model.q_proj = Block()
    model.router = nn.Linear(8, 4)
    assert list(N.select_noise_layers(model)) == ["q_proj.base_layer", "router"]
    assert list(N.select_noise_layers(model, only_analog=True)) == ["q_proj.base_layer"]
    assert len(N.select_noise_layers(model, skip_adapters=False)) == 4
    lora_before = model.q_proj.lora_A["default"].weight.detach().clone()
    N.apply_noise_(model, N.PCMProgrammingNoise(), seed=0, only_analog=True)
    assert torch.equal(model.q_proj.lora_A["default"].weight, lora_before)


def test_apply_noise_argument_errors(llama):
    with pytest.raises(TypeError, match="NoiseModel"):
        N.apply_noise_(llama, "pcm", seed=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        N.apply_noise_(llama, N.PCMProgrammingNoise(), seed=1.5)  # type: ignore[arg-type]


def test_only_analog_with_real_analog_layers(llama):
    afm = pytest.importorskip("afm")
    if not hasattr(afm, "convert") or not hasattr(afm, "analog_layers"):
        pytest.skip("afm.convert is not available yet")
    afm.convert(llama, afm.get_preset("afm-paper"), exclude=["down_proj"])
    analog = list(afm.analog_layers(llama))
    assert analog and all("down_proj" not in n for n in analog)
    assert list(N.select_noise_layers(llama, only_analog=True)) == analog
    before = state_snapshot(llama)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad(), N.apply_noise_(llama, N.PCMProgrammingNoise(), seed=0, only_analog=True):
        assert torch.isfinite(llama(ids).logits).all()
        changed = {k for k, v in llama.state_dict().items() if not torch.equal(v, before[k])}
        assert changed == {n + ".weight" for n in analog}
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())
