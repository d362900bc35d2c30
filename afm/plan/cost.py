"""What a model costs on a chip, per generated token (``afm-plan cost``).

The stated model (docs/plan.md has it with the numbers):

* Mapping, weight-stationary: a ``[N, K]`` matrix takes ``ceil(K/rows) · ceil(N/cols)``
  crossbars (``× E`` for E fused experts, all programmed); it fits when the crossbars
  needed are at most the chip's (``cores · crossbars_per_core``); otherwise the report
  counts the chips needed and times the token on that many.  Utilisation is weights
  over the cells of the crossbars used.
* Per token (decoding, batch 1, at position ``context``): a used crossbar does one MVM,
  with ``rows`` DAC and ``cols`` ADC conversions at most (the rows and columns that hold
  weights); analog MACs are ``K · N`` per active matrix.  Each ADC output is scaled and
  accumulated digitally (2 operations).
* Digital work left: matrices kept digital (the output head by default, a placement's
  digital layers, routers), attention over ``context`` cached tokens (QKᵀ and AV,
  softmax, rotary), norms, activations, residual adds, LoRA adapters
  (``r·(K+N)`` MACs per adapted layer).  A MAC is 2 operations.
* Latency: matrices one after another, each taking ``ceil(active MVMs / cores)``
  crossbar MVM times (its tiles spread over the cores, no overlap between layers or
  with digital work); digital work at ``digital_ops_per_s``.  Energy: ADC conversions at
  ``mvm_energy / cols`` each (array and DACs included), digital operations at
  ``digital_energy_pj``.  Communication and static power are not modelled.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from afm.analog.select import name_matches
from afm.plan.chips import ChipSpec
from afm.plan.shapes import Matrix, model_matrices, text_config

__all__ = ["CostReport", "chip_cost"]

#: digital operations per element of the elementwise work (approximations, stated)
OPS_PER_ELEMENT = {
    "rms_norm": 4,  # square, sum, scale by 1/rms, weight
    "layer_norm": 6,  # mean, subtract, square, sum, scale, weight (+ bias)
    "activation": 5,  # SiLU (negate, exp, add, divide) and the gating multiply
    "softmax": 5,  # scale, max, subtract-exp, sum, divide per attention score
    "rotary": 3,  # x·cos + rotate(x)·sin per query / key element
}
_DOWN = ("down_proj", "fc2", "mlp.c_proj", "w2", "dense_4h_to_h")


@dataclass
class CostReport:
    """The cost of one model on one chip (see the module docstring for the model)."""

    model: str
    config_source: str
    chip: ChipSpec
    context: int
    lora_rank: int
    params: int
    analog_params: int
    digital_params: int
    crossbars: int
    cores_needed: int
    chips_needed: int
    fits: bool
    utilisation: float
    analog_macs: int
    adc_conversions: int
    dac_conversions: int
    mvms: int
    digital_ops: dict[str, int]
    analog_time_ns: float
    matrices: list[dict[str, Any]] = field(default_factory=list)
    uncounted: list[str] = field(default_factory=list)

    @property
    def digital_ops_total(self) -> int:
        return sum(self.digital_ops.values())

    @property
    def digital_share(self) -> float:
        """Share of all operations (2 per MAC) done digitally."""
        total = self.digital_ops_total + 2 * self.analog_macs
        return self.digital_ops_total / total if total else 0.0

    @property
    def digital_time_ns(self) -> float:
        return 1e9 * self.digital_ops_total / self.chip.digital_ops_per_s

    @property
    def analog_energy_nj(self) -> float:
        return self.adc_conversions * self.chip.conversion_energy_pj / 1000.0

    @property
    def digital_energy_nj(self) -> float:
        return self.digital_ops_total * self.chip.digital_energy_pj / 1000.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["chip"] = self.chip.to_dict()
        latency = {"analog": self.analog_time_ns, "digital": self.digital_time_ns}
        energy = {"analog": self.analog_energy_nj, "digital": self.digital_energy_nj}
        out["latency_ns"] = {**latency, "total": sum(latency.values())}
        out["energy_nj"] = {**energy, "total": sum(energy.values())}
        out["digital_ops_total"] = self.digital_ops_total
        out["digital_share"] = self.digital_share
        return out


def _is_analog(
    m: Matrix, analog: Collection[str] | None, digital: Sequence[str], analog_head: bool
) -> bool:
    if m.kind not in ("linear", "head", "experts"):
        return False
    if digital and name_matches(m.name, digital):
        return False
    if m.kind == "experts":
        return True  # afm cannot simulate fused experts; the cost maps them analog
    if analog is None:  # afm.convert's default: the head stays digital
        return m.kind == "linear" or analog_head
    return m.name in analog


def _check_names(analog: Collection[str] | None, mats: list[Matrix]) -> None:
    if analog is None:
        return
    known = {m.name for m in mats if m.kind in ("linear", "head")}
    for name in sorted(set(analog) - known):
        close = difflib.get_close_matches(name, sorted(known), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"placement layer {name!r} is not a linear layer of the model{hint}")


def _analog_row(m: Matrix, chip: ChipSpec) -> dict[str, Any]:
    tk = math.ceil(m.in_features / chip.crossbar_rows)
    tn = math.ceil(m.out_features / chip.crossbar_cols)
    return {
        "crossbars": tk * tn * m.copies,
        "mvms": tk * tn * m.active,
        "adc": tk * m.out_features * m.active,
        "dac": m.in_features * tn * m.active,
        "analog_macs": m.macs_per_token,
    }


def _attention_ops(config: Any, context: int, rotary: bool) -> int:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    types = getattr(config, "layer_types", None) or [None] * config.num_hidden_layers
    ops = 0
    for kind in types:
        span = min(context, window) if window and kind in (None, "sliding_attention") else context
        ops += 2 * 2 * heads * dim * span + OPS_PER_ELEMENT["softmax"] * heads * span
        ops += OPS_PER_ELEMENT["rotary"] * (heads + kv) * dim if rotary else 0
    return ops


def _elementwise_ops(model: nn.Module, mats: list[Matrix], config: Any) -> dict[str, int]:
    norms = 0
    for module in model.modules():
        cls = type(module).__name__.lower()
        weight = getattr(module, "weight", None)
        if "norm" in cls and weight is not None and weight.ndim == 1:
            per = OPS_PER_ELEMENT["layer_norm" if "layernorm" in cls else "rms_norm"]
            norms += per * weight.numel()
    act = sum(m.in_features * m.active for m in mats if m.name.endswith(_DOWN))
    return {
        "norms": norms,
        "activations": OPS_PER_ELEMENT["activation"] * act,
        "residual adds": 2 * config.num_hidden_layers * config.hidden_size,
    }


@dataclass
class _Tally:
    """The per-matrix rows and their sums (analog mapping and per-token counts)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    crossbars: int = 0
    mvms: int = 0
    adc: int = 0
    dac: int = 0
    analog_macs: int = 0
    analog_params: int = 0
    digital_params: int = 0

    def add_analog(self, m: Matrix, row: dict[str, Any]) -> None:
        for key in ("crossbars", "mvms", "adc", "dac", "analog_macs"):
            setattr(self, key, getattr(self, key) + row[key])
        self.analog_params += m.params


def _tally(
    mats: list[Matrix],
    chip: ChipSpec,
    ops: dict[str, int],
    analog: Collection[str] | None,
    digital: Sequence[str],
    lora_rank: int,
    lora_targets: Sequence[str] | None,
    analog_head: bool,
) -> _Tally:
    """Map every matrix (analog / digital / looked up) and add its work to ``ops``."""
    tally = _Tally()
    for key in ("output head", "digital layers", "routers", "tile outputs", "lora adapters"):
        ops[key] = 0
    for m in mats:
        row: dict[str, Any] = {"name": m.name, "kind": m.kind, "in": m.in_features}
        row.update(out=m.out_features, copies=m.copies, active=m.active)
        tally.rows.append(row)
        if m.kind in ("embedding", "uncounted"):
            row["placement"] = "lookup" if m.kind == "embedding" else "uncounted"
            continue
        if not _is_analog(m, analog, digital, analog_head):
            row["placement"] = "digital"
            tally.digital_params += m.params
            key = {"head": "output head", "router": "routers"}.get(m.kind, "digital layers")
            ops[key] += 2 * m.macs_per_token
            continue
        row.update(placement="analog", **_analog_row(m, chip))
        tally.add_analog(m, row)
        # each ADC output is scaled and accumulated over the input tiles, the bias added
        ops["tile outputs"] += 2 * row["adc"] + (m.out_features * m.active if m.bias else 0)
        adapted = lora_targets is None or name_matches(m.name, lora_targets)
        if lora_rank and m.kind == "linear" and adapted:
            row["lora_macs"] = lora_rank * (m.in_features + m.out_features) * m.active
            ops["lora adapters"] += 2 * row["lora_macs"] + m.out_features * m.active
    return tally


def chip_cost(
    model: nn.Module,
    chip: ChipSpec,
    *,
    name: str = "model",
    config_source: str = "",
    analog: Collection[str] | None = None,
    digital: Sequence[str] = (),
    context: int = 1024,
    lora_rank: int = 0,
    lora_targets: Sequence[str] | None = None,
    analog_head: bool = False,
) -> CostReport:
    """The cost of ``model`` (real or on the meta device) on ``chip`` per token.

    ``analog``: the analog layers (a placement's ``modules``); None is afm.convert's
    default (every linear layer but the output head).  ``digital``: name patterns kept
    digital on top of that.  Fused MoE experts are analog unless ``digital`` names them.
    ``lora_rank`` > 0 adds digital LoRA adapters to the analog layers matching
    ``lora_targets`` (all analog linear layers when None).  ``analog_head``: the output
    head analog too (as IBM's AFM code converts it), when no placement is given.
    """
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"context={context!r} is invalid: must be a positive int")
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
        raise ValueError(f"lora_rank={lora_rank!r} is invalid: must be an int >= 0")
    mats = model_matrices(model)
    _check_names(analog, mats)
    config = text_config(model.config)
    rotary = any("rotary" in type(m).__name__.lower() for m in model.modules())
    ops = {"attention": _attention_ops(config, context, rotary)}
    ops.update(_elementwise_ops(model, mats, config))
    t = _tally(mats, chip, ops, analog, digital, lora_rank, lora_targets, analog_head)
    chips = max(1, math.ceil(t.crossbars / chip.capacity))
    parallel = chip.cores * chips  # one crossbar of a core computes at a time
    analog_ns = sum(
        math.ceil(r["mvms"] / parallel) * chip.mvm_time_ns
        for r in t.rows
        if r["placement"] == "analog"
    )
    cells = t.crossbars * chip.crossbar_rows * chip.crossbar_cols
    return CostReport(
        model=name,
        config_source=config_source,
        chip=chip,
        context=context,
        lora_rank=lora_rank,
        params=sum(p.numel() for p in model.parameters()),
        analog_params=t.analog_params,
        digital_params=t.digital_params,
        crossbars=t.crossbars,
        cores_needed=math.ceil(t.crossbars / chip.crossbars_per_core),
        chips_needed=chips if t.crossbars else 0,
        fits=t.crossbars <= chip.capacity,
        utilisation=t.analog_params / cells if cells else 0.0,
        analog_macs=t.analog_macs,
        adc_conversions=t.adc,
        dac_conversions=t.dac,
        mvms=t.mvms,
        digital_ops=ops,
        analog_time_ns=analog_ns,
        matrices=t.rows,
        uncounted=[r["name"] for r in t.rows if r["placement"] == "uncounted"],
    )
