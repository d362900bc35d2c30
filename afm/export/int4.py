"""4-bit digital export in the compressed-tensors ``pack-quantized`` format.

``export_int4(model_or_dir, out_dir)`` writes a plain HuggingFace checkpoint whose
linear layers hold symmetric round-to-nearest 4-bit weights (per output channel or
per group) packed by the ``compressed-tensors`` library.  It loads with a plain
``AutoModelForCausalLM.from_pretrained(out_dir)`` (transformers + compressed-tensors,
no afm needed) and with vLLM.

The quantization is spec §3's: ``Δ = max|W| / 7`` over each channel or group,
``q = clamp(round(W/Δ), ±7)``; the integers are computed in fp32 exactly as
:func:`afm.reference.fake_quantize_weight` computes them and ``Δ`` is stored in the
layer's dtype.  For fp32 models the loaded weights are bit-identical to
``fake_quantize_weight(W)`` (checked for every layer while exporting); for bf16 /
fp16 models they differ by the rounding of ``Δ`` to that dtype (about one ulp).

Analog models are exported as their digital weights: ``AnalogLinear`` becomes
``nn.Linear`` and ``input_range`` is not written (the format cannot express input
clipping).  The caller's model is never modified.

Requires the ``export`` extra: ``pip install 'afm[export]'`` (compressed-tensors).
"""

from __future__ import annotations

import copy
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from afm.analog.convert import revert
from afm.analog.hf import QUANT_METHOD
from afm.analog.select import is_conv1d, is_experts, untie_word_embeddings
from afm.export.rtn import (
    DEFAULT_SKIP,
    W4_BITS,
    check_group_divides,
    check_group_size,
    select_w4_layers,
)
from afm.export.summary import ExportSummary, LayerExport
from afm.models import resolve_model
from afm.reference import fake_quantize_weight
from afm.validation import check_safetensors_files

logger = logging.getLogger(__name__)

__all__ = [
    "UnsupportedExportError",
    "check_out_dir",
    "digital_twin",
    "export_int4",
    "find_adapter_layers",
    "refuse_adapters",
    "refuse_foreign_quantizer",
    "refuse_fused_layers",
    "source_model",
    "write_checkpoint",
]


class UnsupportedExportError(ValueError):
    """The model holds layers the pack-quantized format cannot express (nothing written)."""


QMAX = 2 ** (W4_BITS - 1) - 1  # 7: symmetric levels -7..7


# --------------------------------------------------------------------------- checks
def find_adapter_layers(model: nn.Module) -> list[str]:
    """Names of peft adapter layers (LoRA etc.) in ``model``; [] without peft loaded.

    peft is not imported here: a model can only hold peft layers if peft is loaded.
    """
    peft = sys.modules.get("peft")
    if peft is None:
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = [n or "<root>" for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if not names and isinstance(model, getattr(peft, "PeftModel", ())):
        names = ["<PeftModel>"]
    return names


def refuse_adapters(model: nn.Module) -> None:
    names = find_adapter_layers(model)
    if names:
        more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        raise ValueError(
            f"the model has unmerged peft LoRA adapters (e.g. {names[0]!r}{more}); the int4 "
            "export writes base weights only. Either merge a digital adapter first "
            "(afm.revert on a copy, then peft's merge_and_unload(); never merge into "
            "AnalogLinear layers, which changes the logits), or export the base model "
            "(peft_model.unload()) and keep the adapter separate"
        )


def refuse_foreign_quantizer(model: nn.Module) -> None:
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    method = getattr(quantizer.quantization_config, "quant_method", None)
    method = str(getattr(method, "value", method))
    if method != QUANT_METHOD:
        raise ValueError(
            f"the model is already quantized with {method!r}; export from the original "
            "(unquantized or afm) checkpoint instead"
        )


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        what = "is a file" if not out_dir.is_dir() else "exists and is not empty"
        raise ValueError(
            f"output directory {str(out_dir)!r} {what}; choose a new or empty directory"
        )


def _import_compressed_tensors() -> Any:
    try:
        import compressed_tensors  # noqa: F401
        from compressed_tensors.compressors import PackedQuantizationCompressor
        from compressed_tensors.config import CompressionFormat
        from compressed_tensors.quantization import (
            QuantizationArgs,
            QuantizationConfig,
            QuantizationScheme,
            QuantizationStatus,
        )
    except ImportError as err:
        raise ImportError(
            f"afm.export needs the compressed-tensors library: pip install 'afm[export]' ({err})"
        ) from err
    return (
        PackedQuantizationCompressor,
        CompressionFormat,
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )


# --------------------------------------------------------------------------- loading
def _load_source(source: str | Path) -> tuple[nn.Module, str]:
    """Load a model directory (or afm alias / hub id) with afm's quantizer registered
    (this module imports ``afm.analog.hf``, which registers it)."""
    from transformers import AutoModelForCausalLM

    name = str(source)
    resolved = resolve_model(name)
    if Path(resolved).is_dir() and not (Path(resolved) / "config.json").is_file():
        raise ValueError(f"cannot load the model in {resolved!r}: it has no config.json")
    if Path(resolved).is_dir():
        check_safetensors_files(resolved)  # a truncated file: one line naming it
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype="auto")
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if Path(resolved).is_dir():
            raise ValueError(f"cannot load the model in {resolved!r}: {first}") from err
        raise ValueError(
            f"cannot load model {name!r}: not a model directory, an afm alias, or a "
            f"reachable hub id ({first})"
        ) from err
    return model, resolved


def digital_twin(model: nn.Module) -> nn.Module:
    """A digital copy of ``model`` that shares its tensors (no weight is copied).

    Modules and the config are copied, parameters and buffers are not; ``afm.revert``
    then swaps the copy's analog layers for ``nn.Linear`` (dropping ``input_range``)
    without touching the caller's model.
    """
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    twin = copy.deepcopy(model, memo)
    revert(twin)
    return twin


TOKENIZER_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "spiece.model",
    "chat_template*",
)


def _tokenizer_files(directory: Path) -> list[Path]:
    files = {p for pattern in TOKENIZER_FILES for p in directory.glob(pattern) if p.is_file()}
    return sorted(files)


def _save_tokenizer(tokenizer: Any, source: str | None, out: Path) -> bool:
    """Copy the tokenizer next to the exported model; True if one was written.

    A tokenizer object is saved with ``save_pretrained``; a directory (the ``tokenizer``
    argument, or else the source model's directory) has its tokenizer files copied
    byte for byte, so nothing is re-interpreted on the way.
    """
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        tokenizer.save_pretrained(str(out))
        return True
    path = tokenizer if tokenizer is not None else source
    if path is None:
        return False
    directory = Path(path)
    if directory.is_dir():
        files = _tokenizer_files(directory)
        if files:
            for f in files:
                shutil.copy2(f, out / f.name)
            return True
        if tokenizer is not None:
            raise ValueError(f"no tokenizer files in {str(directory)!r}")
        logger.warning("afm.export: no tokenizer files in %s; none copied", directory)
        return False
    from transformers import AutoTokenizer  # a hub id: load (from the cache) and save

    try:
        AutoTokenizer.from_pretrained(str(path)).save_pretrained(str(out))
    except (OSError, ValueError, TypeError) as err:
        if tokenizer is not None:
            raise ValueError(f"cannot load tokenizer {str(path)!r}: {err}") from err
        logger.warning("afm.export: no tokenizer for %s (%s); none copied", path, err)
        return False
    return True


# --------------------------------------------------------------------------- export
_DENSE_HINT = (
    "nothing was written. Export instead the dense RTN-W4 checkpoint "
    "(afm.export.export_rtn_w4, afm-export --dense): the 4-bit values stored in the model "
    "dtype, which plain transformers loads and whose logits equal RTN-W4 of the digital "
    "weights"
)


def refuse_fused_layers(model: nn.Module) -> None:
    """Refuse, before anything is written, layers compressed-tensors cannot pack.

    Its ``pack-quantized`` format quantizes ``nn.Linear`` modules (``weight`` [out, in])
    only: transformers' fused MoE experts (3-D ``gate_up_proj`` / ``down_proj``) are not
    modules it can target, and transformers cannot load such a checkpoint even with the
    experts left dense (its per-expert weight conversion fails under the
    compressed-tensors quantizer); GPT-2's ``Conv1D`` stores ``[in, out]``, which the
    packer would scale per input instead of per output channel.
    """
    experts = [n for n, m in model.named_modules() if is_experts(m)]
    if experts:
        raise UnsupportedExportError(
            f"afm-export: the model has {len(experts)} MoE experts modules (e.g. "
            f"{experts[0]!r}) with fused 3-D weights; the compressed-tensors pack-quantized "
            f"format packs nn.Linear layers only and cannot express fused experts; " + _DENSE_HINT
        )
    conv1d = [n for n, m in model.named_modules() if is_conv1d(m)]
    if conv1d:
        raise UnsupportedExportError(
            f"afm-export: the model has {len(conv1d)} GPT-2 Conv1D layers (e.g. "
            f"{conv1d[0]!r}, weight stored [in, out]); the compressed-tensors pack-quantized "
            "format packs nn.Linear layers ([out, in], one scale per output row) only; "
            + _DENSE_HINT
        )


def _w4_scale(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``Δ = max|W| / 7`` per channel [N, 1] or per group [N, K/g], fp32.

    The same expression as :func:`afm.reference.fake_quantize_weight` (zero rows get
    Δ = 1); the export checks every layer against that function.
    """
    w = weight.float()
    n_out, k = w.shape
    g = w if group_size is None else w.reshape(n_out, k // group_size, group_size)
    scale = g.abs().amax(dim=-1, keepdim=group_size is None) / QMAX
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def source_model(model_or_dir: nn.Module | str | Path) -> tuple[nn.Module, str | None]:
    """The model to export and the directory its tokenizer files may come from."""
    if not isinstance(model_or_dir, nn.Module):
        return _load_source(model_or_dir)
    name_or_path = getattr(model_or_dir, "name_or_path", None) or ""
    return model_or_dir, str(name_or_path) if name_or_path and Path(name_or_path).is_dir() else None


def _pack_layers(
    twin: nn.Module,
    targets: dict[str, nn.Linear],
    group_size: int | None,
    compressor: Any,
    scheme: Any,
) -> tuple[dict[str, torch.Tensor], list[LayerExport], bool]:
    """``(state dict with packed weights, per-layer report, whether to untie the head)``.

    Each layer is packed by compressed-tensors and decompressed again (what
    ``from_pretrained`` will load) to measure its error against the fp32 weight and
    against :func:`afm.reference.fake_quantize_weight`.
    """
    state = twin.state_dict()
    # Storage shared between a quantized weight and anything else (a tied output head
    # quantized with skip=()): the quantized layer gets its own tensors, so untie.
    storage_users: dict[tuple, int] = {}
    for tensor in state.values():
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape))
        storage_users[key] = storage_users.get(key, 0) + 1
    untie = False
    layers: list[LayerExport] = []
    for name, layer in targets.items():
        w = layer.weight.detach()
        if storage_users.get((w.device, w.data_ptr(), tuple(w.shape)), 0) > 1:
            untie = True
        w32 = w.to("cpu", torch.float32)
        scale32 = _w4_scale(w32, group_size)
        packed = compressor.compress({"weight": w32, "weight_scale": scale32}, scheme)
        packed["weight_scale"] = packed["weight_scale"].to(w.dtype)
        # Round trip through the library's decompression = what from_pretrained loads.
        loaded = compressor.decompress(dict(packed), scheme)["weight"].to(w.dtype).float()
        ref = fake_quantize_weight(w.to("cpu"), W4_BITS, group_size).float()
        state.pop(f"{name}.weight")
        for key, tensor in packed.items():
            state[f"{name}.{key}"] = tensor.contiguous()
        layers.append(
            LayerExport(
                name=name,
                shape=(layer.out_features, layer.in_features),
                bytes_before=w.numel() * 2,
                bytes_after=sum(t.numel() * t.element_size() for t in packed.values()),
                max_abs_error=float((w32 - loaded).abs().max()),
                max_ref_diff=float((loaded - ref).abs().max()),
            )
        )
        if w.dtype == torch.float32 and layers[-1].max_ref_diff > 0:
            logger.warning(
                "afm.export: layer %s differs from fake_quantize_weight by %g",
                name,
                layers[-1].max_ref_diff,
            )
    return state, layers, untie


def write_checkpoint(
    twin: nn.Module, out: Path, state: dict, tokenizer: Any, source_dir: str | None
) -> bool:
    """Save the model and its tokenizer; on any failure leave ``out`` as it was."""
    created = not out.exists()
    try:
        twin.save_pretrained(str(out), state_dict=state)
        return _save_tokenizer(tokenizer, source_dir, out)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:  # it was empty: leave it empty
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise


def export_int4(
    model_or_dir: nn.Module | str | Path,
    out_dir: str | Path,
    *,
    group_size: int | None = None,
    skip: tuple[str, ...] | list[str] = DEFAULT_SKIP,
    tokenizer: Any = None,
) -> ExportSummary:
    """Write a 4-bit compressed-tensors (``pack-quantized``) checkpoint.

    Args:
        model_or_dir: a causal LM in memory (plain or afm-converted; not modified), or
            a checkpoint directory / afm alias (loaded with ``from_pretrained`` after
            ``import afm``, in its stored dtype).
        out_dir: a new or empty directory.
        group_size: None for one scale per output channel, else one scale per group of
            this many consecutive inputs (32, 64, 128 are what int4 kernels support);
            it must divide the input dimension of every quantized layer.
        skip: linear layers kept in the model dtype, by exact name, dotted suffix or
            regular expression (default: the output head); a pattern that matches no
            linear layer is an error (with the closest names), never a silent no-op.
        tokenizer: a tokenizer or a path to save next to the model; default: the one in
            the source directory (or in ``model.name_or_path`` when that is a local
            directory).

    Returns:
        An :class:`ExportSummary` (``print`` it for a table).

    Raises:
        UnsupportedExportError: MoE experts or GPT-2 Conv1D layers (see
            :func:`refuse_fused_layers`; :func:`afm.export.dense.export_rtn_w4` exports
            them); nothing is written.
        ValueError: unmerged peft adapters, a non-empty ``out_dir``, an invalid group
            size or one that does not divide a layer's input dimension, a ``skip``
            pattern that matches no layer, a model already quantized by another method,
            a source that cannot be loaded.
        ImportError: compressed-tensors is not installed.
    """
    out = Path(out_dir)
    check_group_size(group_size)
    if isinstance(skip, str):
        skip = (skip,)
    check_out_dir(out)
    (
        Compressor,
        CompressionFormat,
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    ) = _import_compressed_tensors()

    model, source_dir = source_model(model_or_dir)
    refuse_adapters(model)
    refuse_foreign_quantizer(model)

    twin = digital_twin(model)
    refuse_fused_layers(twin)
    targets, skipped = select_w4_layers(twin, skip)  # every skip pattern must match
    check_group_divides(targets, group_size)
    args = QuantizationArgs(
        num_bits=W4_BITS,
        type="int",
        symmetric=True,
        strategy="channel" if group_size is None else "group",
        group_size=group_size,
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    state, layers, untie = _pack_layers(twin, targets, group_size, Compressor, scheme)
    notes: list[str] = []
    if untie:
        untie_word_embeddings(twin)
        notes.append("note: the quantized output head was untied from the input embedding")
    qconfig = QuantizationConfig(
        config_groups={"group_0": scheme},
        format=CompressionFormat.pack_quantized.value,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=sorted(skipped),
    )
    twin.config.quantization_config = qconfig.model_dump(mode="json")
    tokenizer_saved = write_checkpoint(twin, out, state, tokenizer, source_dir)
    files_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    dtypes = sorted({str(layer.weight.dtype).removeprefix("torch.") for layer in targets.values()})
    summary = ExportSummary(
        out_dir=str(out),
        group_size=group_size,
        dtype="/".join(dtypes),
        layers=tuple(layers),
        skipped=tuple(skipped),
        tokenizer_saved=tokenizer_saved,
        files_bytes=files_bytes,
        notes=tuple(notes),
    )
    logger.info(
        "afm.export: %d layers -> int4 (%.3f of bf16), max |dW| %.3g, written to %s",
        summary.layers_quantized,
        summary.ratio,
        summary.max_abs_error,
        out,
    )
    return summary
