"""The ``"afm"`` lm-eval model: ``HFLM`` for afm checkpoints and analog-converted models.

Importing this module imports ``lm_eval`` and registers the model name ``"afm"``::

    import afm.evaluate.lm_eval_model  # registers "afm"
    from lm_eval import simple_evaluate
    simple_evaluate(model="afm",
                    model_args="pretrained=tiny,preset=afm-paper,noise=pcm,noise_seed=3",
                    tasks=["toyworld_arith"])

``pretrained`` is an afm checkpoint, a plain HF model (alias, directory or hub id) or a
loaded ``PreTrainedModel``.  ``preset`` converts a plain model on the fly (input ranges
calibrated on ``calib``), ``rtn_w4`` quantizes it first, ``noise`` / ``noise_seed`` /
``drift`` program it once onto a simulated chip (``afm.analog.noise``).  ``apply_noise`` and
``restore_noise`` change the chip of a live instance (``afm-eval`` uses them to run many
seeds without reloading).
"""

from __future__ import annotations

from typing import Any

# First: afm's quantizer must be registered before any checkpoint is loaded, or an afm
# checkpoint loads as a digital model (importing any afm module runs afm/__init__, which
# imports it too; this says so where it matters).
import afm.analog.hf  # noqa: F401, I001

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "afm.evaluate.lm_eval_model needs lm-eval: pip install 'afm[lm-eval]'"
    ) from err

from afm.analog.noise import NoiseHandle, NoiseModel, apply_noise_, get_noise_model
from afm.evaluate.loading import load_model_spec
from afm.evaluate.specs import ModelSpec, as_bool

__all__ = ["AfmLM"]


@register_model("afm")
class AfmLM(HFLM):
    """lm-eval's ``HFLM`` on a (possibly analog, possibly noisy) afm model."""

    def __init__(
        self,
        pretrained: Any,
        *,
        preset: str | None = None,
        rtn_w4: bool | str = False,
        group_size: int | None = None,
        calib: str = "toyworld",
        calib_steps: int = 16,
        noise: str | None = None,
        noise_seed: int = 0,
        noise_scale: float | None = None,
        drift: str | float | None = None,
        tokenizer: Any = None,
        device: str | None = "cpu",
        dtype: str | None = "float32",
        **kwargs: Any,
    ) -> None:
        self._noise_handle: NoiseHandle | None = None
        if isinstance(pretrained, str):
            spec = ModelSpec(
                pretrained,
                preset=preset or None,
                rtn_w4=as_bool("rtn_w4", rtn_w4),
                group_size=int(group_size) if group_size else None,
                calib=calib,
                calib_steps=int(calib_steps),
                dtype=dtype if dtype not in (None, "auto") else "float32",
            )
            pretrained, loaded_tok = load_model_spec(spec, device or "cpu")
            tokenizer = tokenizer or loaded_tok
        elif preset or rtn_w4:
            raise ValueError("preset / rtn_w4 apply only when pretrained is a name or path")
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)
        if noise:
            opts: dict[str, Any] = {}
            if noise_scale is not None:
                opts["scale"] = float(noise_scale)
            if drift is not None:
                opts["t_inference"] = drift
            self.apply_noise(get_noise_model(str(noise), **opts), int(noise_seed))

    def apply_noise(self, noise_model: NoiseModel, seed: int) -> NoiseHandle:
        """Program the model with ``noise_model`` (restoring any previous noise first)."""
        self.restore_noise()
        self._noise_handle = apply_noise_(self.model, noise_model, seed)
        return self._noise_handle

    def restore_noise(self) -> None:
        """Put the noise-free weights back (bitwise); no-op without noise."""
        if self._noise_handle is not None:
            self._noise_handle.restore()
            self._noise_handle = None

    def get_model_info(self) -> dict[str, Any]:
        info = super().get_model_info()
        if self._noise_handle is not None:
            info["afm_noise"] = self._noise_handle.noise_model.to_dict()
            info["afm_noise_seed"] = self._noise_handle.seed
        return info
