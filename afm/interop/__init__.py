"""Bringing analog models from other toolkits into afm, without running their pickles.

* ``ibm_afm`` — :func:`import_ibm_afm` (``afm-import``): IBM's published analog
  foundation models (aihwkit-lightning state dicts + a dill-pickled ``rpu_config``)
  as afm checkpoints;
* ``unpickle`` — the restricted unpickler and the allowlist of aihwkit-lightning's
  config classes and enums;
* ``lightning_config`` — ``TorchInferenceRPUConfig`` → ``AnalogConfig``, field by field;
* ``state`` — aihwkit-lightning state dicts → afm parameter names;
* ``source`` — local directory or hub id, and the files the format has.

Neither aihwkit-lightning nor dill is needed.  Docs: docs/import.md.
"""

from afm.interop.ibm_afm import REPORT_FILE, ImportSummary, import_ibm_afm
from afm.interop.lightning_config import (
    LightningMapping,
    UnsupportedRpuConfig,
    map_rpu_config,
    read_rpu_fields,
)
from afm.interop.source import MissingFilesError, find_source_files
from afm.interop.state import StateMismatchError
from afm.interop.unpickle import RestrictedUnpickler, UnsafePickleError, load_rpu_config

__all__ = [
    "REPORT_FILE",
    "ImportSummary",
    "LightningMapping",
    "MissingFilesError",
    "RestrictedUnpickler",
    "StateMismatchError",
    "UnsafePickleError",
    "UnsupportedRpuConfig",
    "find_source_files",
    "import_ibm_afm",
    "load_rpu_config",
    "map_rpu_config",
    "read_rpu_fields",
]
