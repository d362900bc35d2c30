"""Old import path: ``afm.patch`` moved to ``afm.analog.convert`` (2026-12 layout); this alias stays
for code written before the move and warns once.  afm's own modules never import it."""

import warnings

from afm.analog.convert import analog_layers, convert, revert  # noqa: F401

warnings.warn(
    "afm.patch moved to afm.analog.convert; import it from there (or from afm)",
    DeprecationWarning,
    stacklevel=2,
)
