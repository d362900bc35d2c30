"""What :func:`afm.export.int4.export_int4` wrote: per-layer sizes and errors, a table."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["ExportSummary", "LayerExport"]


@dataclass(frozen=True)
class LayerExport:
    """One quantized layer: name, weight shape, bytes and the weight error."""

    name: str
    shape: tuple[int, int]
    bytes_before: int
    """bf16-equivalent size of the weight (2 bytes per element)."""
    bytes_after: int
    """``weight_packed`` + ``weight_scale`` + ``weight_shape`` as written."""
    max_abs_error: float
    """``max |W - W_loaded|`` (fp32 math), W_loaded = what ``from_pretrained`` rebuilds."""
    max_ref_diff: float
    """``max |W_loaded - fake_quantize_weight(W)|``: 0 for fp32 models."""


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`export_int4` wrote."""

    out_dir: str
    group_size: int | None
    dtype: str
    layers: tuple[LayerExport, ...]
    skipped: tuple[str, ...]
    """Linear layers kept in the model dtype (``skip`` matches)."""
    tokenizer_saved: bool
    files_bytes: int
    """Total size of the written ``*.safetensors`` files."""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def layers_quantized(self) -> int:
        return len(self.layers)

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else math.nan

    @property
    def max_abs_error(self) -> float:
        return max((layer.max_abs_error for layer in self.layers), default=0.0)

    @property
    def max_ref_diff(self) -> float:
        return max((layer.max_ref_diff for layer in self.layers), default=0.0)

    def by_kind(self) -> dict[str, list[LayerExport]]:
        """Layers grouped by their last name component (``q_proj``, ``down_proj``...)."""
        kinds: dict[str, list[LayerExport]] = {}
        for layer in self.layers:
            kinds.setdefault(layer.name.rsplit(".", 1)[-1], []).append(layer)
        return kinds

    def __str__(self) -> str:
        gran = "per channel" if self.group_size is None else f"group {self.group_size}"
        head = (
            f"{'layer':<16}{'count':>6}{'bf16 MiB':>11}{'int4 MiB':>11}{'ratio':>8}{'max|dW|':>11}"
        )
        lines = [
            f"afm export: int4 pack-quantized ({gran}, scales {self.dtype}) -> {self.out_dir}",
            head,
            "-" * len(head),
        ]

        def row(label: str, layers: list[LayerExport]) -> str:
            before = sum(x.bytes_before for x in layers)
            after = sum(x.bytes_after for x in layers)
            err = max((x.max_abs_error for x in layers), default=0.0)
            ratio = after / before if before else math.nan
            return (
                f"{label:<16}{len(layers):>6}{before / 2**20:>11.3f}{after / 2**20:>11.3f}"
                f"{ratio:>8.3f}{err:>11.3g}"
            )

        for kind, layers in self.by_kind().items():
            lines.append(row(kind, layers))
        lines.append("-" * len(head))
        lines.append(row("total", list(self.layers)))
        lines.append(
            f"kept in {self.dtype}: {', '.join(self.skipped) if self.skipped else 'none'}; "
            f"tokenizer {'copied' if self.tokenizer_saved else 'NOT copied'}; "
            f"safetensors on disk {self.files_bytes / 2**20:.3f} MiB"
        )
        lines.extend(self.notes)
        return "\n".join(lines)
