"""The dense RTN-W4 checkpoint: 4-bit values stored in the model dtype.

For the layers compressed-tensors' ``pack-quantized`` format cannot express (MoE fused
experts, GPT-2 ``Conv1D``: :func:`afm.export.int4.refuse_fused_layers`),
``export_rtn_w4(model_or_dir, out_dir)`` writes the digital model with every linear map
replaced by its RTN-W4 value (:func:`afm.export.rtn.rtn_w4`: each expert matrix and each
Conv1D per output channel or group), saved with ``save_pretrained``.  Plain transformers
loads it (no afm, no compressed-tensors) and its logits equal RTN-W4 of the digital
weights; it is not smaller on disk than the source.  The caller's model is not modified.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from torch import nn

from afm.analog.convert import revert
from afm.export.int4 import (
    check_out_dir,
    refuse_adapters,
    refuse_foreign_quantizer,
    source_model,
    write_checkpoint,
)
from afm.export.rtn import DEFAULT_SKIP, check_group_size, rtn_w4

logger = logging.getLogger(__name__)

__all__ = ["export_rtn_w4"]


def export_rtn_w4(
    model_or_dir: nn.Module | str | Path,
    out_dir: str | Path,
    *,
    group_size: int | None = None,
    skip: tuple[str, ...] | list[str] = DEFAULT_SKIP,
    tokenizer: Any = None,
) -> Path:
    """Write the dense RTN-W4 checkpoint of ``model_or_dir`` to ``out_dir`` (new or empty).

    Arguments as :func:`afm.export.int4.export_int4`; analog models are exported as their
    digital weights.  Returns the output directory.

    Raises:
        ValueError: unmerged peft adapters, a non-empty ``out_dir``, an invalid group size,
            a ``skip`` pattern that matches no layer, a foreign quantization.
    """
    out = Path(out_dir)
    check_group_size(group_size)
    check_out_dir(out)
    model, source_dir = source_model(model_or_dir)
    refuse_adapters(model)
    refuse_foreign_quantizer(model)
    # A full copy (ties kept): rtn_w4 writes in place, never into the caller's tensors.
    twin = revert(copy.deepcopy(model))
    rtn_w4(twin, group_size=group_size, skip=tuple(skip))
    write_checkpoint(twin, out, twin.state_dict(), tokenizer, source_dir)
    logger.info("afm.export: dense RTN-W4 checkpoint written to %s", out)
    return out
