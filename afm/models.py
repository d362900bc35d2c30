"""Model alias registry: short names for the models afm is demonstrated on.

>>> resolve_model("tiny")            # the bundled toy-world teacher (a local directory)
'.../afm/assets/tiny'
>>> resolve_model("phi-3-mini")
'microsoft/Phi-3-mini-4k-instruct'

Any other string is passed through unchanged (a local directory or a hub id).
:func:`load_model` / :func:`load_tokenizer` call ``from_pretrained`` on the
resolved name; if that fails because the name is neither an alias, nor a local
directory, nor reachable on the hub, one :class:`ModelNotFoundError` says so,
lists the aliases and explains how to point at a local directory.

afm checkpoints: importing this module imports the ``afm`` package first, which registers
afm's quantizer with transformers, so :func:`load_model` returns the analog model (this
module sits below ``afm.analog`` and cannot import it; :func:`load_model` checks the
registration instead).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["ALIASES", "ModelNotFoundError", "resolve_model", "load_model", "load_tokenizer"]

_TINY_DIR = Path(__file__).resolve().parent / "assets" / "tiny"

#: alias -> hub id (or, for ``tiny``, the bundled directory)
ALIASES: dict[str, str] = {
    "tiny": str(_TINY_DIR),
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
}


class ModelNotFoundError(OSError):
    """The name is not an alias, not a local directory, and could not be fetched."""


def _tiny_dir() -> str:
    from importlib.resources import files  # the installed package data (also editable)

    return str(files("afm.assets") / "tiny")


def resolve_model(name_or_path: str | Path) -> str:
    """Alias -> hub id or bundled directory; anything else is returned unchanged."""
    name = str(name_or_path)
    key = name.strip().lower()
    if key == "tiny":
        return _tiny_dir()
    return ALIASES.get(key, name)


def _not_found(name: str, resolved: str, err: Exception) -> ModelNotFoundError:
    aliases = ", ".join(
        f"{k!r} -> {v if k != 'tiny' else 'bundled toy-world teacher'}" for k, v in ALIASES.items()
    )
    via = f" (resolved to {resolved!r})" if resolved != name else ""
    return ModelNotFoundError(
        f"cannot load model {name!r}{via}: it is not a known alias, not an existing local "
        f"directory, and could not be fetched from the Hugging Face Hub ({type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}). Known aliases: {aliases}. To use a "
        "model stored locally, pass the path of a directory that contains its config.json and "
        "weights (e.g. one written by save_pretrained), or download it first and set "
        "HF_HUB_OFFLINE=1."
    )


def _load(loader: Any, name_or_path: str | Path, **kwargs: Any) -> Any:
    name = str(name_or_path)
    resolved = resolve_model(name)
    try:
        return loader.from_pretrained(resolved, **kwargs)
    except (OSError, ValueError) as err:
        if Path(resolved).is_dir():
            raise  # a real directory with a real problem: keep the original error
        raise _not_found(name, resolved, err) from err


def _require_afm_quantizer() -> None:
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    if "afm" not in AUTO_QUANTIZER_MAPPING:
        raise RuntimeError(
            "afm's quantizer is not registered with transformers, so an afm checkpoint "
            "would load as a digital model; import afm (import afm.analog.hf) first"
        )


def load_model(name_or_path: str | Path, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` on the resolved alias/path/hub id (an afm
    checkpoint comes back analog: afm's quantizer is registered)."""
    from transformers import AutoModelForCausalLM

    _require_afm_quantizer()
    return _load(AutoModelForCausalLM, name_or_path, **kwargs)


def load_tokenizer(name_or_path: str | Path, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained`` on the resolved alias/path/hub id."""
    from transformers import AutoTokenizer

    return _load(AutoTokenizer, name_or_path, **kwargs)
