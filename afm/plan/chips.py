"""Chip descriptions for ``afm-plan cost``: crossbars, cores, converters, timing, energy.

A :class:`ChipSpec` is the hardware shape a model is mapped onto (not the noise model
afm simulates: that is an ``AnalogConfig`` preset).  Named chips are data with their
sources; a YAML file overrides any field (``base: hermes`` picks the starting chip).

IBM HERMES (Le Gallo et al., "A 64-core mixed-signal in-memory compute chip based on
phase-change memory for deep neural network inference", Nature Electronics 6, 680-693,
2023): 64 cores in 14 nm CMOS, each a 256×256 crossbar of PCM unit cells with its own
256 ADCs; for 8-bit input/output MVMs the chip reaches 63.1 TOPS at 9.76 TOPS/W in the
one-phase (low-precision) read mode and 16.1 TOPS at 2.48 TOPS/W in the four-phase
(high-precision) mode.  The per-MVM figures below are derived from those: one
256×256 MVM is 2·256² = 131 072 operations, so 63.1 TOPS over 64 cores is 133 ns per
core MVM and 9.76 TOPS/W is 13.4 nJ per MVM (521 ns and 52.9 nJ in four-phase mode).

3D-SiM (Büchel et al., "Efficient scaling of large language models with mixture of
experts and 3D analog in-memory computing", Nature Computational Science 5, 2025; code
IBM/3D-CiM-LLM-Inference-Simulator): the simulator's example 3D accelerator, 100 tiles
of 1024 stacked 512×512 tiers (one tier of a tile computes at a time), 100 ns and
10 nJ per MVM (its ``AcceleratorConfig`` defaults).

The digital unit that runs what stays digital (attention, norms, the output head,
LoRA adapters) is not characterised in either paper: 1 TOPS at 1 pJ per operation is
afm's stated assumption for a small digital datapath next to the crossbars.  Override
it (``digital_ops_per_s``, ``digital_energy_pj``) for your system.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afm.plan.inputs import PlanInputError, read_yaml_mapping
from afm.validation import check_bits, check_int, check_real

__all__ = ["CHIPS", "ChipSpec", "get_chip", "load_chip"]

_DIGITAL_ASSUMPTION = "digital unit: afm assumption (1 TOPS, 1 pJ/op), not a published figure"


@dataclass(frozen=True)
class ChipSpec:
    """The hardware a model is mapped onto, weight-stationary (every weight programmed
    once; nothing is re-programmed between tokens)."""

    name: str
    source: str = ""
    crossbar_rows: int = 256
    """Inputs per crossbar (word lines): a layer's input dimension is split into tiles
    of at most this many rows."""
    crossbar_cols: int = 256
    """Outputs per crossbar (bit lines, one ADC conversion each per MVM)."""
    cores: int = 64
    """Cores computing in parallel, each with its own DACs and ADCs."""
    crossbars_per_core: int = 1
    """Crossbars stacked in one core (3D tiers); one of them computes at a time."""
    dac_bits: int = 8
    adc_bits: int = 8
    mvm_time_ns: float = 133.0
    """One crossbar MVM: inputs applied, integrated, every column converted."""
    mvm_energy_nj: float = 13.4
    """One full MVM (all rows and columns); a conversion costs ``1/crossbar_cols`` of it."""
    digital_ops_per_s: float = 1e12
    digital_energy_pj: float = 1.0
    """Energy per digital operation (a multiply-accumulate is 2 operations)."""

    def __post_init__(self) -> None:
        owner = "ChipSpec"
        for name in ("crossbar_rows", "crossbar_cols", "cores", "crossbars_per_core"):
            check_int(owner, name, getattr(self, name), minimum=1)
        check_bits(owner, "dac_bits", self.dac_bits)
        check_bits(owner, "adc_bits", self.adc_bits)
        for name in ("mvm_time_ns", "mvm_energy_nj", "digital_ops_per_s", "digital_energy_pj"):
            check_real(owner, name, getattr(self, name), strict=True)

    @property
    def capacity(self) -> int:
        """Crossbars on one chip."""
        return self.cores * self.crossbars_per_core

    @property
    def conversion_energy_pj(self) -> float:
        """Energy of one ADC conversion with its share of the array and the DACs."""
        return 1000.0 * self.mvm_energy_nj / self.crossbar_cols

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHIPS: dict[str, ChipSpec] = {
    "hermes": ChipSpec(
        "hermes",
        "IBM HERMES, Le Gallo et al., Nature Electronics 2023: 64 cores of 256x256 PCM, "
        "14 nm, one-phase read (63.1 TOPS, 9.76 TOPS/W -> 133 ns, 13.4 nJ per MVM); "
        + _DIGITAL_ASSUMPTION,
    ),
    "hermes-4phase": ChipSpec(
        "hermes-4phase",
        "IBM HERMES, Le Gallo et al., Nature Electronics 2023, four-phase high-precision "
        "read (16.1 TOPS, 2.48 TOPS/W -> 521 ns, 52.9 nJ per MVM); " + _DIGITAL_ASSUMPTION,
        mvm_time_ns=521.0,
        mvm_energy_nj=52.9,
    ),
    "3d-sim": ChipSpec(
        "3d-sim",
        "3D-SiM example accelerator (Buechel et al., Nature Computational Science 2025; "
        "IBM/3D-CiM-LLM-Inference-Simulator): 100 tiles x 1024 tiers of 512x512, "
        "100 ns / 10 nJ per MVM; " + _DIGITAL_ASSUMPTION,
        crossbar_rows=512,
        crossbar_cols=512,
        cores=100,
        crossbars_per_core=1024,
        mvm_time_ns=100.0,
        mvm_energy_nj=10.0,
    ),
}


def get_chip(name: str) -> ChipSpec:
    """A named chip; the error lists the names."""
    try:
        return CHIPS[name]
    except KeyError:
        raise PlanInputError(f"unknown chip {name!r}; available: {', '.join(CHIPS)}") from None


def load_chip(path: str | Path | None = None, name: str = "hermes") -> ChipSpec:
    """The chip ``name``, with the fields of a YAML file (``path``) overriding it; the
    file may pick another starting chip with ``base:``.  Unknown keys are refused."""
    chip = get_chip(name)
    if path is None:
        return chip
    p = Path(path)
    data = read_yaml_mapping(p, "chip file")
    if "base" in data:
        chip = get_chip(str(data.pop("base")))
    fields = {f.name for f in dataclasses.fields(ChipSpec)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise PlanInputError(
            f"chip file {str(p)!r}: unknown keys {unknown}; allowed: base, "
            + ", ".join(sorted(fields))
        )
    for f in dataclasses.fields(ChipSpec):
        if f.type == "float" and isinstance(data.get(f.name), str):
            try:  # YAML reads 1e12 (no dot) as a string
                data[f.name] = float(data[f.name])
            except ValueError:
                pass  # ChipSpec's validator names the field and the value
    data.setdefault("name", f"{chip.name}+{p.stem}")
    data.setdefault("source", f"{chip.source}; overridden by {p.name}")
    return dataclasses.replace(chip, **data)
