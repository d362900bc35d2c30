"""Field validators shared by every afm config (hardware, noise, data, training, runs).

Each raises ``ValueError("<owner>.<field>=<value> is invalid: <why>")`` so an error
always names the field and the value.  ``owner`` is the dataclass name
(``"InputQuantConfig"``) or the user-facing section (``"train"``, ``"data"``); an empty
owner names a command-line flag alone (``"--device='cuda' is invalid: ..."``).

Besides the fields: :func:`check_device` (a device that exists on this machine),
:func:`check_output_path` (a directory that can be written) and
:func:`check_safetensors_files` (checkpoint files that are whole) — the checks every
entry point makes before it loads or writes anything.
"""

from __future__ import annotations

import json
import math
import os
from enum import Enum
from pathlib import Path
from typing import Any

__all__ = [
    "fail",
    "check_bits",
    "check_bool",
    "check_choice",
    "check_device",
    "check_int",
    "check_output_path",
    "check_real",
    "check_safetensors_files",
    "coerce_enum",
]


def fail(owner: str, name: str, value: Any, why: str) -> None:
    """Raise the one error message format of afm's validators."""
    field = f"{owner}.{name}" if owner else name
    raise ValueError(f"{field}={value!r} is invalid: {why}")


def check_bits(owner: str, name: str, bits: Any) -> None:
    """An int in [2, 16] or None (quantization off)."""
    if bits is None:
        return
    if isinstance(bits, bool) or not isinstance(bits, int):
        fail(owner, name, bits, "must be an int or None")
    if not 2 <= bits <= 16:
        fail(owner, name, bits, "must be between 2 and 16 (None switches quantization off)")


def check_real(
    owner: str,
    name: str,
    value: Any,
    *,
    minimum: float = 0.0,
    strict: bool = False,
    maximum: float | None = None,
) -> None:
    """A finite number >= ``minimum`` (> with ``strict``) and <= ``maximum``; no bools."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(owner, name, value, "must be a number")
    if not math.isfinite(value):
        fail(owner, name, value, "must be finite")
    if strict and value <= minimum:
        fail(owner, name, value, f"must be > {minimum}")
    if not strict and value < minimum:
        fail(owner, name, value, f"must be >= {minimum}")
    if maximum is not None and value > maximum:
        fail(owner, name, value, f"must be <= {maximum}")


def check_int(
    owner: str, name: str, value: Any, *, minimum: int | None = None, allow_none: bool = False
) -> None:
    """An int (not a bool) >= ``minimum``; None only with ``allow_none``."""
    if value is None and allow_none:
        return
    suffix = " or None" if allow_none else ""
    if isinstance(value, bool) or not isinstance(value, int):
        fail(owner, name, value, f"must be an int{suffix}")
    if minimum is not None and value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        fail(owner, name, value, f"must be {what}{suffix}")


def check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        fail(owner, name, value, "must be true or false")


def check_choice(owner: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        fail(owner, name, value, f"must be one of {choices}")


def coerce_enum(owner: str, name: str, enum_cls: type[Enum], value: Any) -> Enum:
    """``value`` as a member of ``enum_cls`` (members and their values accepted)."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum_cls)
        fail(owner, name, value, f"must be one of {allowed}")
    raise AssertionError  # unreachable


def check_device(owner: str, name: str, value: Any, *, allow_none: bool = True) -> None:
    """A torch device that exists on this machine (``"cpu"``, ``"cuda"``, ``"cuda:1"``,
    ``"mps"`` ...); None only with ``allow_none``.  ``--device cuda`` without a GPU is
    refused here, not by an assertion deep inside torch."""
    if value is None and allow_none:
        return
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        fail(owner, name, value, "not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')")
    if device.type == "cpu":
        return
    if device.type == "meta":
        fail(owner, name, value, "the meta device holds no data; use 'cpu' or 'cuda'")
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        available, count = bool(mps and mps.is_available()), 1
    else:
        backend = getattr(torch, device.type, None)
        available = bool(backend is not None and backend.is_available())
        count = backend.device_count() if available else 0
    if not available:
        fail(owner, name, value, f"no {device.type} device is available on this machine")
    if device.index is not None and device.index >= count:
        fail(owner, name, value, f"this machine has {count} {device.type} device(s)")


def check_output_path(name: str, path: str | os.PathLike[str]) -> Path:
    """``path`` as a directory that exists and is writable, or can be created (nothing is
    created here); ``name`` is the flag or key that gave it (``"--out"``)."""
    out = Path(path).expanduser()
    if out.exists():
        if not out.is_dir():
            fail("", name, str(path), "a file, not a directory")
        if not os.access(out, os.W_OK | os.X_OK):
            fail("", name, str(path), "a directory this user cannot write")
        return out
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        fail("", name, str(path), f"cannot be created: {str(ancestor)!r} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        fail("", name, str(path), f"cannot be created: {str(ancestor)!r} is not writable")
    return out


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (None: it is).  Reads the header only:
    the file must hold exactly the bytes the header's offsets declare."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > 100_000_000:
            return f"{size} bytes, but its header claims {n} header bytes (truncated)"
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "its header is not valid JSON (damaged)"
    if not isinstance(header, dict):
        return "its header is not a mapping (damaged)"
    ends = [
        v["data_offsets"][1]
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and len(v.get("data_offsets", ())) == 2
    ]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"{size} bytes where its header declares {expected} (truncated or damaged)"
    return None


def check_safetensors_files(directory: str | os.PathLike[str]) -> None:
    """Every ``*.safetensors`` file of a checkpoint directory is whole (header readable,
    size as declared) and every shard its ``*.safetensors.index.json`` names exists;
    otherwise one ``ValueError`` naming the file.  Cheap: the tensors are not read."""
    d = Path(directory)
    for index in sorted(d.glob("*.safetensors.index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(
                f"checkpoint index {str(index)!r} is damaged (no weight_map)"
            ) from None
        for shard in sorted(shards):
            if not (d / shard).is_file():
                raise ValueError(f"checkpoint file {str(d / shard)!r} is missing ({index.name})")
    for f in sorted(d.glob("*.safetensors")):
        problem = _safetensors_problem(f)
        if problem:
            raise ValueError(
                f"checkpoint file {str(f)!r} is damaged: {problem}; restore or re-save it"
            )
