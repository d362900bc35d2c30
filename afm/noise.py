"""Old import path: ``afm.noise`` moved to ``afm.analog.noise`` (2026-12 layout); this
alias stays for code written before the move and warns once.  afm's own modules never
import it."""

import warnings

from afm.analog.noise import *  # noqa: F403
from afm.analog.noise import __all__  # noqa: F401

warnings.warn(
    "afm.noise moved to afm.analog.noise; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
