"""The matrices of a model, read from its modules (weights not needed: the meta device).

:func:`meta_model` builds a model from its config alone (``AutoConfig`` +
``from_config`` under ``torch.device("meta")``), so billion-parameter models are
planned without their weights; the configs of the models afm is demonstrated on are
bundled (:data:`BUNDLED_CONFIGS`, copies of the published ``config.json`` sizes).
:func:`model_matrices` lists every weight matrix with its shape:

* linear layers (``nn.Linear``, GPT-2 ``Conv1D``), the output head among them;
* fused MoE experts, 3-D parameters ``[E, out, in]`` (``[E, in, out]`` when the experts
  module says ``is_transposed``), ``num_experts_per_tok`` of them active per token;
* other 2-D weights of routers (``...Router`` / ``...Gate`` modules), digital;
* embedding tables (looked up, no multiply-accumulates).

Anything else 2-D or larger is listed as uncounted, never dropped silently.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from afm.analog.select import is_conv1d, is_linear_like, output_head_names
from afm.models import resolve_model

__all__ = [
    "BUNDLED_CONFIGS",
    "Matrix",
    "load_config",
    "meta_model",
    "model_matrices",
    "text_config",
]

logger = logging.getLogger(__name__)

_CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: name -> (bundled config file, where its sizes come from)
BUNDLED_CONFIGS: dict[str, tuple[str, str]] = {
    "phi-3-mini": ("phi-3-mini.json", "microsoft/Phi-3-mini-4k-instruct config.json"),
    "llama-3.2-1b": ("llama-3.2-1b.json", "meta-llama/Llama-3.2-1B-Instruct config.json"),
    "mixtral-8x7b": ("mixtral-8x7b.json", "mistralai/Mixtral-8x7B-Instruct-v0.1 config.json"),
}


@dataclass(frozen=True)
class Matrix:
    """One weight matrix ``[out_features, in_features]`` (``copies`` of it for experts)."""

    name: str
    kind: str
    """``linear``, ``head``, ``experts``, ``router``, ``embedding`` or ``uncounted``."""
    in_features: int
    out_features: int
    copies: int = 1
    active: int = 1
    """Copies used per token (``num_experts_per_tok`` for experts, else 1)."""
    bias: bool = False

    @property
    def params(self) -> int:
        return self.in_features * self.out_features * self.copies

    @property
    def macs_per_token(self) -> int:
        """Multiply-accumulates per token (embeddings are looked up: none)."""
        if self.kind in ("embedding", "uncounted"):
            return 0
        return self.in_features * self.out_features * self.active


def text_config(config: Any) -> Any:
    """The language model's config (multimodal configs keep it in ``text_config``)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def load_config(name_or_path: str) -> tuple[Any, str]:
    """``(config, where it came from)``: a bundled config name, a ``config.json`` file, a
    local directory, an afm alias or a hub id (``AutoConfig.from_pretrained``)."""
    from transformers import AutoConfig

    key = str(name_or_path).strip()
    if key.lower() in BUNDLED_CONFIGS:
        file, source = BUNDLED_CONFIGS[key.lower()]
        path = _CONFIG_DIR / file
        return AutoConfig.from_pretrained(str(path)), f"bundled copy of {source}"
    path = Path(key).expanduser()
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"model config {key!r} is not valid JSON: {err}") from None
        if not isinstance(data, dict) or "model_type" not in data:
            raise ValueError(f"model config {key!r} has no 'model_type'")
        return AutoConfig.from_pretrained(str(path)), str(path)
    resolved = resolve_model(key)
    source = "afm's bundled tiny teacher (afm/assets/tiny)" if key.lower() == "tiny" else resolved
    try:
        return AutoConfig.from_pretrained(resolved), source
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"cannot read the config of {key!r} ({first}); pass a config.json, a local "
            f"directory or one of the bundled configs: {', '.join(BUNDLED_CONFIGS)}"
        ) from None


def meta_model(name_or_path: str) -> tuple[nn.Module, str]:
    """``(model on the meta device, config source)``: shapes only, no weights, no memory."""
    from transformers import AutoModelForCausalLM

    config, source = load_config(name_or_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model, source


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.nf)  # Conv1D stores [in, out]
    return int(module.in_features), int(module.out_features)


def _experts_per_token(model: nn.Module, name: str) -> int:
    config = text_config(getattr(model, "config", None))
    k = getattr(config, "num_experts_per_tok", None) if config is not None else None
    if not isinstance(k, int) or k < 1:
        raise ValueError(
            f"{name} holds fused MoE experts but the model config has no "
            "num_experts_per_tok: cannot count the active experts per token"
        )
    return k


def model_matrices(model: nn.Module) -> list[Matrix]:
    """Every weight matrix of ``model`` (module docstring), in module order."""
    heads = output_head_names(model)
    out: list[Matrix] = []
    for mod_name, module in model.named_modules():
        if is_linear_like(module):
            k, n = _linear_shape(module)
            kind = "head" if mod_name in heads else "linear"
            out.append(Matrix(mod_name, kind, k, n, bias=module.bias is not None))
            continue
        for p_name, param in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            out.append(_other_matrix(model, module, full, param))
    return [m for m in out if m is not None]


def _other_matrix(
    model: nn.Module, module: nn.Module, name: str, param: torch.Tensor
) -> Matrix | None:
    if param.ndim < 2:
        return None  # norms, biases, scales: counted as elementwise work by cost
    if isinstance(module, nn.Embedding):
        return Matrix(name, "embedding", int(param.shape[1]), int(param.shape[0]))
    cls = type(module).__name__.lower()
    if param.ndim == 3:
        e, a, b = (int(s) for s in param.shape)
        k, n = (a, b) if getattr(module, "is_transposed", False) else (b, a)
        return Matrix(name, "experts", k, n, copies=e, active=_experts_per_token(model, name))
    if param.ndim == 2 and ("router" in cls or "gate" in cls):
        return Matrix(name, "router", int(param.shape[1]), int(param.shape[0]))
    logger.warning("afm-plan: %s %s is not counted", name, tuple(param.shape))
    shape = tuple(int(s) for s in param.shape)
    return Matrix(name, "uncounted", shape[-1], math.prod(shape[:-1]))
