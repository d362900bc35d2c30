"""Old import path: ``afm.hf`` moved to ``afm.analog.hf`` (2026-12 layout); this alias stays
for code written before the move and warns once.  afm's own modules never import it."""

import warnings

from afm.analog.hf import (  # noqa: F401
    AfmHfQuantizer,
    AfmQuantizationConfig,
    attach_quantization_config,
    is_afm_checkpoint_config,
)

warnings.warn(
    "afm.hf moved to afm.analog.hf; import it from there (or from afm)",
    DeprecationWarning,
    stacklevel=2,
)
