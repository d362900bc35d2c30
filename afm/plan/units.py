"""What sensitivity and placement decide about: units of one layer or one block.

A :class:`Unit` is a set of analog-capable layers switched together: one linear layer
(``units="layers"``) or every linear layer of one decoder block (``units="blocks"``,
``model.layers.3``).  Names given by users (budget files, ``--keep-digital``) are
checked here: an unknown name is a :class:`PlanInputError` that suggests close ones.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from torch import nn

from afm.plan.inputs import PlanInputError

__all__ = ["GRANULARITIES", "Unit", "block_of", "make_units", "resolve_units"]

GRANULARITIES = ("layers", "blocks")
_INDEX = re.compile(r"^\d+$")


@dataclass(frozen=True)
class Unit:
    name: str
    layers: tuple[str, ...]
    params: int


def block_of(layer: str) -> str:
    """The decoder block of a layer: its name up to the first numeric component
    (``model.layers.3.mlp.up_proj`` → ``model.layers.3``); the name itself if none."""
    parts = layer.split(".")
    for i, part in enumerate(parts):
        if _INDEX.match(part):
            return ".".join(parts[: i + 1])
    return layer


def make_units(layers: Mapping[str, nn.Module], granularity: str = "layers") -> list[Unit]:
    """The units over ``layers`` (``{name: linear module}``, in model order)."""
    if granularity not in GRANULARITIES:
        raise PlanInputError(f"units={granularity!r} is invalid: choose one of {GRANULARITIES}")
    groups: dict[str, list[str]] = {}
    for name in layers:
        groups.setdefault(name if granularity == "layers" else block_of(name), []).append(name)
    return [
        Unit(key, tuple(names), sum(layers[n].weight.numel() for n in names))
        for key, names in groups.items()
    ]


def resolve_units(names: Iterable[str], units: Collection[Unit], what: str) -> set[str]:
    """The unit names meant by ``names``: a unit's name, one of its layers (its unit), or a
    block name covering several units.  Unknown names raise, naming ``what``."""
    by_name = {u.name: u for u in units}
    out: set[str] = set()
    for name in names:
        if name in by_name:
            out.add(name)
            continue
        hits = {u.name for u in units if name in u.layers or block_of(u.name) == name}
        if not hits:
            known = sorted(set(by_name) | {n for u in units for n in u.layers})
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise PlanInputError(
                f"{what}: {name!r} is not an analog-capable layer or block of the model{hint}"
            )
        out |= hits
    return out
