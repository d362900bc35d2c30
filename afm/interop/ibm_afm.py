"""``import_ibm_afm``: IBM's published analog foundation models as afm checkpoints.

IBM publishes its AFMs (``ibm-aimc/analog-Phi-3-mini-4k-instruct``,
``ibm-aimc/analog-Llama-3.2-1B-Instruct``) as aihwkit-lightning state dicts plus a
``dill``-pickled ``rpu_config``; their ``example.py`` loads both with code-executing
unpicklers, builds the FP model from ``config.json``, ``convert_to_analog``s every
``nn.Linear`` (the output head included) and loads the state dict strictly.

This module does the same without running anything from the download
(``afm.interop.unpickle``), maps the chip onto afm's ``AnalogConfig``
(``afm.interop.lightning_config``) and the state onto afm's parameter names
(``afm.interop.state``), and writes a plain afm checkpoint: safetensors +
``config.json`` with the afm quantization config, tokenizer files, and
``afm_import.json`` (what was read, mapped and dropped).  After ``import afm``,
``AutoModelForCausalLM.from_pretrained(out)`` rebuilds the analog model.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from afm.analog.convert import convert
from afm.analog.hf import attach_quantization_config
from afm.analog.layers import analog_layers
from afm.interop.lightning_config import (
    LightningMapping,
    UnsupportedRpuConfig,
    map_rpu_config,
    read_rpu_fields,
)
from afm.interop.source import SourceFiles, fetch, find_source_files
from afm.interop.state import (
    LightningState,
    StateMismatchError,
    range_counters,
    read_state_dict,
    to_afm_state,
)
from afm.interop.unpickle import load_rpu_config, plain

logger = logging.getLogger(__name__)

__all__ = ["REPORT_FILE", "ImportSummary", "import_ibm_afm"]

REPORT_FILE = "afm_import.json"

#: Modules aihwkit-lightning's ``convert_to_analog`` converts besides ``nn.Linear``
#: (exact classes, as its conversion map matches them); afm does not simulate them.
_UNSUPPORTED_ANALOG = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LSTM, nn.GRU, nn.RNN)


@dataclass(frozen=True)
class ImportSummary:
    """What :func:`import_ibm_afm` wrote."""

    out_dir: str
    architecture: str
    analog_layers: int
    tiles: int
    """The largest tile count of a layer (1: no tiling)."""
    ranges_calibrated: bool
    """The checkpoint's input ranges were initialised from data (afm's init_steps = 0)."""
    notes: tuple[str, ...]

    def __str__(self) -> str:
        lines = [
            f"afm-import: wrote {self.out_dir} ({self.architecture}, {self.analog_layers} "
            f"analog layers, up to {self.tiles} tile(s) per layer)",
            *(f"  note: {n}" for n in self.notes),
            f"  details: {Path(self.out_dir) / REPORT_FILE}",
        ]
        return "\n".join(lines)


def _check_embedded(mapping: LightningMapping, embedded: Mapping[str, Any]) -> None:
    """Copies of the rpu_config inside the state dict must mean the same chip as the
    rpu_config file (aihwkit-lightning rewrites derived fields such as
    ``modifier.noise_type`` in its copies, so the mapped configs are compared)."""
    for where, rpu in embedded.items():
        other, _ = read_rpu_fields(rpu)
        if map_rpu_config(other).config == mapping.config:
            continue
        fields = mapping.fields
        diff = ", ".join(
            f"{k}={other[k]!r} (rpu_config: {fields[k]!r})" for k in fields if fields[k] != other[k]
        )
        raise UnsupportedRpuConfig(
            f"the state dict ({where}) embeds an rpu_config for another chip: {diff}; "
            "refusing to guess which one applies"
        )


def _calibration(
    mapping: LightningMapping, counters: dict[str, list[int]]
) -> tuple[LightningMapping, bool, dict]:
    """Map ``input_range_update_idx``: all done → init_steps 0; none → as configured."""
    needed = mapping.fields["pre_post.input_range.init_from_data"]
    seen = [c for tiles in counters.values() for c in tiles]
    info = {
        "init_from_data": needed,
        "min": min(seen, default=None),
        "max": max(seen, default=None),
    }
    if not seen or not mapping.config.input.uses_range or needed == 0:
        return mapping, False, info
    if min(seen) >= needed:
        return mapping.with_ranges_calibrated(), True, info
    if max(seen) == 0:
        return mapping, False, info
    layer, tiles = next((n, t) for n, t in counters.items() if min(t) < needed)
    raise UnsupportedRpuConfig(
        f"input_range_update_idx: layer {layer!r} has its input ranges initialised from "
        f"{min(tiles)} of pre_post.input_range.init_from_data={needed} batches (others up to "
        f"{max(seen)}); afm cannot resume a partial initialisation (its calibration pass "
        "starts over)"
    )


def _chip(fields: dict[str, Any], state: LightningState) -> tuple[LightningMapping, dict]:
    """The afm chip of the ``rpu_config`` fields, checked against the state dict's copies
    and with the range-initialisation counters applied."""
    mapping = map_rpu_config(fields)
    _check_embedded(mapping, state.embedded_configs)
    mapping, calibrated, info = _calibration(mapping, range_counters(state.tensors))
    return mapping, {**info, "ranges_calibrated": calibrated}


def _hf_config(files: SourceFiles, dtype: torch.dtype) -> tuple[Any, list[str]]:
    """``config.json`` (JSON only, no remote code) with the references to code removed."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(files.directory))
    dropped = [k for k in ("auto_map",) if getattr(config, k, None)]
    for k in dropped:
        delattr(config, k)
    config.dtype = dtype
    return config, dropped


def _weights_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    counts = Counter(t.dtype for k, t in tensors.items() if k.endswith(".weight"))
    floating = [d for d, _ in counts.most_common() if d.is_floating_point]
    if not floating:
        raise StateMismatchError("the state dict has no floating-point '.weight' tensors")
    return floating[0]


def _build_analog_model(config: Any, mapping: LightningMapping) -> nn.Module:
    """The HF model on the meta device, every exact ``nn.Linear`` made analog (as
    ``convert_to_analog`` does), each with its layer config."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=config.dtype)
    odd = [n for n, m in model.named_modules() if type(m) in _UNSUPPORTED_ANALOG]
    if odd:
        raise UnsupportedRpuConfig(
            f"{type(model).__name__} has {type(model.get_submodule(odd[0])).__name__} module "
            f"{odd[0]!r}, which aihwkit-lightning converts to analog and afm does not simulate"
        )
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    configs = {}
    for name, linear in linears.items():
        try:
            configs[name] = mapping.for_layer(linear.in_features)
        except UnsupportedRpuConfig as err:
            raise UnsupportedRpuConfig(f"layer {name!r}: {err}") from None
    anchored = {n: re.compile(rf"^{re.escape(n)}$") for n in linears}
    overrides = {anchored[n].pattern: c for n, c in configs.items() if c != mapping.config}
    convert(
        model,
        mapping.config,
        include=list(anchored.values()),
        overrides=overrides,
        convert_lm_head=True,
    )
    return model


def _load_state(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    state, dropped = to_afm_state(tensors, model, analog_layers(model))
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        first = " ".join(str(err).split("\n\t")[1:2]) or str(err).splitlines()[0]
        raise StateMismatchError(f"the state dict does not fit config.json: {first}") from None
    return dropped


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output directory {str(out)!r} exists and is not empty; choose a new one")


def _write(model: nn.Module, files: SourceFiles, out: Path, report: dict) -> None:
    """Save into a temporary sibling, then move it into place: no half-written output."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        attach_quantization_config(model)
        model.save_pretrained(str(tmp))
        for f in files.tokenizer_files():
            shutil.copy2(f, tmp / f.name)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked before)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def import_ibm_afm(
    source: str | Path, out_dir: str | Path, *, revision: str | None = None
) -> ImportSummary:
    """Convert an IBM analog foundation model (aihwkit-lightning format) to afm's.

    Args:
        source: a local directory in that format or a hub id (then only the needed
            files are downloaded; without the hub, the error names the missing files).
        out_dir: a new or empty directory for the afm checkpoint.
        revision: hub revision (branch, tag or commit) of ``source``.

    Raises:
        MissingFilesError (an OSError): files missing, or the hub unreachable.
        UnsafePickleError, UnsupportedRpuConfig, StateMismatchError (ValueErrors): a
            pickle outside the allowlist, a chip afm does not model, weights that do
            not fit ``config.json``.  Nothing is written then.
    """
    out = Path(out_dir)
    _check_out_dir(out)
    files = find_source_files(fetch(source, revision))
    rpu = load_rpu_config(files.rpu_config)
    fields, missing = read_rpu_fields(rpu)
    state = read_state_dict(files.weights)
    mapping, counters = _chip(fields, state)
    config, dropped_keys = _hf_config(files, _weights_dtype(state.tensors))
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    model = _build_analog_model(config, mapping)
    dropped = _load_state(model, state.tensors)
    layers = analog_layers(model)
    notes = []
    if missing:
        notes.append(f"fields absent from rpu_config took aihwkit-lightning's defaults: {missing}")
    if counters["ranges_calibrated"]:
        notes.append("input ranges already initialised from data: afm's init_steps set to 0")
    if tied and not model.config.get_text_config().tie_word_embeddings:
        notes.append("the analog output head keeps its own weight (tie_word_embeddings=False)")
    report = {
        "source": str(source),
        "revision": revision,
        "files": [p.name for p in (files.config, files.rpu_config, *files.weights)],
        "rpu_config": plain(rpu),
        "rpu_config_fields_missing": missing,
        "afm_config": mapping.config.to_dict(),
        "analog_layers": sorted(layers),
        "input_range_update_idx": counters,
        "dropped_state": {
            "input_range_update_idx": "summarised above; afm keeps no counters",
            "x_min/x_max": "fast-mode range statistics, unused (fast_mode=False)",
            "count": len(dropped),
        },
        "dropped_config_keys": dropped_keys,
        "notes": notes,
    }
    _write(model, files, out, report)
    for note in notes:
        logger.info("afm-import: %s", note)
    return ImportSummary(
        out_dir=str(out),
        architecture=type(model).__name__,
        analog_layers=len(layers),
        tiles=max(layer.input_range.numel() for layer in layers.values()),
        ranges_calibrated=counters["ranges_calibrated"],
        notes=tuple(notes),
    )
