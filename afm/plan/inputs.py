"""User input to afm-plan: its error type and its YAML files (budgets, chips)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["PlanInputError", "read_yaml_mapping"]


class PlanInputError(ValueError):
    """Bad input to afm-plan (unknown layer, impossible budget ...); the message names it."""


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping in a YAML file; a missing file, bad YAML or another type raise a
    :class:`PlanInputError` naming ``what`` and the file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise PlanInputError(f"{what} {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise PlanInputError(f"{what} {str(p)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise PlanInputError(f"{what} {str(p)!r} must hold a mapping of keys")
    return data
