"""Input-range calibration from data (spec §2.4) and weight clipping after steps (§3)."""

import copy

import pytest
import torch

import afm


def test_clip_hook_and_callback(tiny_model):
    model = tiny_model("llama")
    afm.convert(model, afm.get_preset("afm-paper"))
    layer = model.model.layers[0].mlp.up_proj
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    handle = afm.register_clip_hook(opt, model)
    with torch.no_grad():
        layer.weight[0, 0] = 100.0
    std_before = layer.weight.detach().std(dim=1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert layer.weight[0, 0].item() == pytest.approx(2.5 * std_before[0].item(), rel=1e-5)
    assert torch.all(layer.weight.detach().abs().amax(dim=1) <= 2.5 * std_before * (1 + 1e-5))
    handle.remove()
    cb = afm.clip_callback()
    with torch.no_grad():
        layer.weight[1, 1] = 100.0
    cb.on_optimizer_step(None, None, None, model=model)
    assert layer.weight[1, 1].item() < 100.0


def test_calibration_sets_ranges_from_data(tiny_model):
    model = tiny_model("llama")
    afm.convert(model, afm.get_preset("afm-paper"))
    batches = [{"input_ids": torch.randint(0, 96, (2, 12))} for _ in range(3)]
    captured = {}
    layer = model.model.layers[0].mlp.down_proj
    hook = layer.register_forward_pre_hook(
        lambda m, args: captured.setdefault("x", []).append(args[0].detach().clone())
    )
    used = afm.calibrate_input_ranges_(model, batches, progress=False)
    hook.remove()
    assert used == 3
    # r = mean over batches of 18·std(x) (the running mean of spec §2.4)
    expect = sum(18.0 * x.float().std() for x in captured["x"]) / 3
    assert layer.input_range.item() == pytest.approx(expect.item(), rel=1e-4)
    assert not model.training
    assert all(r.input_range.item() != 3.0 for r in afm.analog_layers(model).values())


@pytest.mark.parametrize("kind", ["batch_encoding", "texts", "dataloader", "tensor"])
def test_calibration_accepts_what_users_have(toy_llama, kind, monkeypatch):
    """A BatchEncoding, texts with a tokenizer, a DataLoader, a tensor: the same ranges as
    the equivalent list of dict batches, and the bar's total is the real batch count."""
    import itertools

    from torch.utils.data import DataLoader, TensorDataset

    import afm.analog.calibration as calibration
    from afm import toyworld as tw

    model, tok = toy_llama()
    texts = list(itertools.islice(tw.training_documents(), 8))
    enc = tok(texts[:4], return_tensors="pt", padding=True)
    ids = enc["input_ids"]
    inputs = {
        "batch_encoding": (enc, [{"input_ids": ids, "attention_mask": enc["attention_mask"]}]),
        "texts": (texts, [dict(tok(texts[i : i + 4], return_tensors="pt", padding=True))
                          for i in (0, 4)]),
        "dataloader": (DataLoader(TensorDataset(ids), batch_size=2), [ids[:2], ids[2:]]),
        "tensor": (ids, [ids]),
    }  # fmt: skip
    given, reference = inputs[kind]
    totals = []
    real_tqdm = calibration.tqdm
    monkeypatch.setattr(
        calibration, "tqdm", lambda *a, **k: totals.append(k["total"]) or real_tqdm(*a, **k)
    )

    def ranges(batches, **kw):
        m = copy.deepcopy(model)
        afm.convert(m, afm.get_preset("afm-paper"))
        used = afm.calibrate_input_ranges_(m, batches, max_steps=10, progress=False, **kw)
        return used, [la.input_range.clone() for la in afm.analog_layers(m).values()]

    used, got = ranges(given, tokenizer=tok, batch_size=4)
    ref_used, want = ranges(reference)
    assert used == ref_used == len(reference) and totals == [len(reference)] * 2
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    if kind == "texts":
        with pytest.raises(ValueError, match="texts need tokenizer="):
            afm.calibrate_input_ranges_(copy.deepcopy(model), texts)
