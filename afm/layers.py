"""Old import path: ``afm.layers`` moved to ``afm.analog.layers`` (2026-12 layout); this alias stays
for code written before the move and warns once.  afm's own modules never import it."""

import warnings

from afm.analog.layers import AnalogLinear, analog_layers  # noqa: F401

warnings.warn(
    "afm.layers moved to afm.analog.layers; import it from there (or from afm)",
    DeprecationWarning,
    stacklevel=2,
)
