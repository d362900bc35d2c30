"""Loading what a :class:`~afm.evaluate.specs.ModelSpec` names: checkpoint or plain
model, optionally RTN-W4 quantized, converted with a preset and calibrated.

afm checkpoints load with their analog layers: this module imports ``afm.analog.hf``
(through ``afm.analog.convert``), which registers the "afm" quantization method.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from afm.analog.calibration import calibrate_on_texts
from afm.analog.convert import convert
from afm.analog.hf import AfmQuantizationConfig, read_quantization_config
from afm.analog.layers import analog_layers
from afm.evaluate.specs import EvalInputError, ModelSpec
from afm.export.rtn import rtn_w4
from afm.models import ModelNotFoundError, load_model, load_tokenizer, resolve_model
from afm.presets import PRESETS, analog_head_of, get_preset
from afm.toyworld.world import training_documents
from afm.validation import check_safetensors_files

__all__ = ["DTYPES", "check_model_spec", "load_model_spec", "read_texts"]

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_texts(path: str | Path, n: int | None = None, what: str = "text file") -> list[str]:
    """The first ``n`` documents (all: None) of a text file: one a line, or JSON lines
    with a ``"text"`` field."""
    p = Path(path)
    if not p.is_file():
        raise EvalInputError(f"{what} {str(path)!r} is not a file")
    texts = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            line = json.loads(line).get("text", "")
        texts.append(line)
        if n is not None and len(texts) >= n:
            break
    if not texts:
        raise EvalInputError(f"{what} {str(path)!r} has no text")
    return texts


def _calibration_texts(source: str, n: int) -> list[str]:
    if source == "toyworld":
        docs = training_documents()
        return [next(docs) for _ in range(n)]
    if not Path(source).is_file():
        raise EvalInputError(
            f"calibration data {source!r} is neither 'toyworld', 'none' nor a file"
        )
    return read_texts(source, n, "calibration file")


def _calibrate(model: nn.Module, tokenizer: Any, spec: ModelSpec) -> None:
    texts = _calibration_texts(spec.calib, spec.calib_steps * 8)
    n = calibrate_on_texts(
        model,
        tokenizer,
        texts,
        batch_size=8,
        max_steps=-(-len(texts) // 8),
        max_length=min(512, getattr(tokenizer, "model_max_length", 512) or 512),
        padding_side="right",
    )
    logger.info("calibrated input ranges of %s on %d batches (%s)", spec.name, n, spec.calib)


def check_model_spec(spec: ModelSpec) -> None:
    """Cheap checks before anything is loaded: dtype, preset, calibration source, and
    that a local path (absolute, ``./``, ``~``, or the ``tiny`` alias) exists."""
    if spec.dtype not in DTYPES:
        raise EvalInputError(f"dtype={spec.dtype!r}: choose one of {sorted(DTYPES)}")
    if spec.preset is not None and spec.placement is not None:
        raise EvalInputError(f"model spec {spec.name!r}: give preset or placement, not both")
    if spec.placement is not None and spec.head is not None:
        raise EvalInputError(
            f"model spec {spec.name!r}: head= does not apply to placement= (the placement "
            "file lists the output head among its analog layers or not)"
        )
    if spec.placement is not None:
        _placement(spec)
    if spec.preset is not None and spec.preset not in PRESETS:
        raise EvalInputError(f"unknown preset {spec.preset!r}; available: {', '.join(PRESETS)}")
    if spec.head is not None and spec.head not in ("analog", "digital"):
        raise EvalInputError(f"head={spec.head!r}: choose 'analog' or 'digital'")
    if spec.head is not None and spec.preset is None:
        raise EvalInputError(
            f"head={spec.head!r} needs preset=...: the head policy applies to an on-the-fly "
            "conversion (a checkpoint keeps its own head, a plain model has no chip)"
        )
    if spec.calib not in ("toyworld", "none") and not Path(spec.calib).is_file():
        raise EvalInputError(
            f"calibration data {spec.calib!r} is neither 'toyworld', 'none' nor a file"
        )
    resolved = resolve_model(spec.path)
    local = resolved.startswith((".", "/", "~")) or resolved != spec.path
    if local and not (Path(resolved).expanduser() / "config.json").is_file():
        raise EvalInputError(f"checkpoint {spec.path!r} not found (no config.json in {resolved})")
    if Path(resolved).expanduser().is_dir():
        check_safetensors_files(Path(resolved).expanduser())  # a truncated file: one line


def _placement(spec: ModelSpec) -> AfmQuantizationConfig:
    try:
        return read_quantization_config(str(spec.placement))
    except ValueError as err:
        raise EvalInputError(f"placement: {err}") from None


def load_model_spec(spec: ModelSpec, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """Load (and convert / quantize / calibrate) a model and its tokenizer, in eval mode."""
    check_model_spec(spec)
    try:
        model = load_model(spec.path, dtype=DTYPES[spec.dtype])
        tokenizer = load_tokenizer(spec.path)
    except ModelNotFoundError as err:
        raise EvalInputError(str(err).split(". Known aliases")[0]) from err
    except OSError as err:
        raise EvalInputError(f"cannot load model {spec.path!r}: {err}") from err
    device = torch.device(device)
    model.to(device)
    if spec.rtn_w4:
        try:
            model = rtn_w4(model, group_size=spec.group_size) or model
        except ValueError as err:
            raise EvalInputError(f"rtn_w4: {err}") from None
    if spec.placement is not None:
        try:  # the placement lists the analog layers (the head among them or not)
            convert(model, _placement(spec))
        except ValueError as err:
            raise EvalInputError(str(err)) from None
    elif spec.preset is not None:
        try:
            config = get_preset(spec.preset)
        except ValueError as err:
            raise EvalInputError(str(err)) from None
        head = analog_head_of(spec.preset) if spec.head is None else spec.head == "analog"
        convert(model, config, convert_lm_head=head)  # deployment noise follows (spec §7)
    if spec.preset is not None or spec.placement is not None:
        uses_range = any(m.analog_config.input.uses_range for m in analog_layers(model).values())
        if uses_range and spec.calib.lower() != "none":
            _calibrate(model, tokenizer, spec)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
