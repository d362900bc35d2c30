"""afm-plan: which layers to put on the chip, and what the chip costs.

* ``sensitivity`` — each layer's (or block's) cost on the chip over noise seeds:
  analog alone, and kept digital while the rest is analog
  (``afm.plan.sensitivity.layer_sensitivity`` on an ``afm.plan.bench.Bench``);
* ``placement`` — the layers to keep digital for an accuracy budget
  (``afm.plan.placement.Budget`` / ``search_placement`` / ``verify_placement``), written
  as an afm config that ``afm.convert``, ``afm-eval`` and ``afm-train`` accept;
* ``cost`` — tiles, conversions, digital work, latency and energy per token on a chip
  description (:class:`ChipSpec`, :func:`chip_cost`), from a config on the meta device;
* ``command`` — the three ``afm-plan`` workflows; ``report`` — markdown and plots.

This package imports only the cost side; the measuring side (``bench``,
``sensitivity``, ``placement``) is imported from its modules.  See docs/plan.md.
"""

from afm.plan.chips import CHIPS, ChipSpec, get_chip, load_chip
from afm.plan.cost import CostReport, chip_cost
from afm.plan.inputs import PlanInputError
from afm.plan.shapes import Matrix, meta_model, model_matrices
from afm.plan.units import Unit, make_units

__all__ = [
    "CHIPS",
    "ChipSpec",
    "CostReport",
    "Matrix",
    "PlanInputError",
    "Unit",
    "chip_cost",
    "get_chip",
    "load_chip",
    "make_units",
    "meta_model",
    "model_matrices",
]
