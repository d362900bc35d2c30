"""Digital exports and the W4 baselines of the AFM paper.

* ``rtn`` — RTN-W4 in place (an evaluation condition) and the W4A8-QAT config;
* ``int4`` — the 4-bit compressed-tensors ``pack-quantized`` checkpoint (``afm-export``),
  ``summary`` — what it wrote;
* ``dense`` — the dense RTN-W4 checkpoint, for MoE experts and GPT-2 Conv1D, which the
  pack-quantized format cannot express.
"""

from afm.export.dense import export_rtn_w4
from afm.export.int4 import UnsupportedExportError, export_int4, find_adapter_layers
from afm.export.rtn import DEFAULT_SKIP, W4_BITS, rtn_w4, select_w4_layers, w4a8_qat_config
from afm.export.summary import ExportSummary, LayerExport

__all__ = [
    "DEFAULT_SKIP",
    "ExportSummary",
    "LayerExport",
    "UnsupportedExportError",
    "W4_BITS",
    "export_int4",
    "export_rtn_w4",
    "find_adapter_layers",
    "rtn_w4",
    "select_w4_layers",
    "w4a8_qat_config",
]
