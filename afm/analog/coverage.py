"""How much of a model is on the chip: ``afm.coverage(model)``.

Counted in parameters of the model's non-embedding linear maps (linear layers, GPT-2
``Conv1D``, fused MoE experts, routers, and any other module that owns a matrix), split
into analog, digital by policy (output head, routers), digital by the caller's choice
(include / exclude) and not supported by afm.  ``afm.convert`` logs it; a model whose
unsupported maps were not excluded never gets that far (convert refuses it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from afm.analog.experts import AnalogExperts
from afm.analog.layers import AnalogLinear
from afm.analog.select import (
    is_adapter_name,
    is_experts,
    is_linear_like,
    output_head_names,
    router_names,
    unsupported_linear_maps,
)

__all__ = ["Coverage", "coverage"]


@dataclass(frozen=True)
class Coverage:
    """Parameter counts of the non-embedding linear maps, by where they run.

    ``unsupported_names`` lists the modules afm cannot put on the chip (none after a
    successful ``afm.convert`` unless the caller excluded them).
    """

    analog: int
    digital_head: int
    digital_router: int
    digital_excluded: int
    unsupported: int
    unsupported_names: tuple[str, ...] = field(default=())

    @property
    def total(self) -> int:
        return (
            self.analog
            + self.digital_head
            + self.digital_router
            + self.digital_excluded
            + self.unsupported
        )

    @property
    def analog_fraction(self) -> float:
        """Analog share of all non-embedding linear-map parameters."""
        return self.analog / self.total if self.total else 0.0

    @property
    def supported_fraction(self) -> float:
        """Analog share of the maps that are neither digital by policy nor unsupported
        (1.0 when everything afm can and should put on the chip is analog)."""
        eligible = self.analog + self.digital_excluded
        return self.analog / eligible if eligible else 0.0

    def summary(self) -> str:
        pct = 100 * self.analog_fraction
        return (
            f"{self.analog:,} of {self.total:,} linear-map parameters analog ({pct:.1f} %); "
            f"digital by policy: head {self.digital_head:,}, routers {self.digital_router:,}; "
            f"digital by choice {self.digital_excluded:,}; not supported {self.unsupported:,}"
        )


def _count(module: nn.Module) -> int:
    return sum(
        p.numel()
        for name, p in module.named_parameters(recurse=False)
        if not name.endswith("input_range")
    )


def coverage(model: nn.Module) -> Coverage:
    """Where the parameters of ``model``'s non-embedding linear maps run (see the module
    doc); peft adapter matrices (digital by design in AHWA-LoRA) are not counted."""
    heads, routers = output_head_names(model), router_names(model)
    unsupported = unsupported_linear_maps(model)
    counts = {"analog": 0, "head": 0, "router": 0, "excluded": 0}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not name or is_adapter_name(name) or name in unsupported:
            continue
        if not (is_linear_like(module) or is_experts(module) or name in routers):
            continue
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, (AnalogLinear, AnalogExperts)):
            kind = "analog"
        elif name in heads:
            kind = "head"
        elif name in routers:
            kind = "router"
        else:
            kind = "excluded"
        counts[kind] += _count(module)
    return Coverage(
        analog=counts["analog"],
        digital_head=counts["head"],
        digital_router=counts["router"],
        digital_excluded=counts["excluded"],
        unsupported=sum(_count(m) for m in unsupported.values()),
        unsupported_names=tuple(sorted(unsupported)),
    )
