"""The resolved configuration of one ``afm-train`` run: YAML in, JSON out, ``--set`` overrides.

Precedence (later wins): dataclass defaults < the model alias's defaults
(:data:`MODEL_DEFAULTS`, e.g. ``tiny``) < ``--config run.yaml`` < ``--preset`` /
``--output`` flags < ``--set key=value``.  Keys are dotted paths into
:class:`RunConfig`: ``preset``, ``data.num_tokens``, ``train.lr``, ``eval.seeds`` ...
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afm.analog.hf import AfmQuantizationConfig, read_quantization_config
from afm.analog.noise import get_noise_model
from afm.config import AnalogConfig, set_by_path
from afm.presets import analog_head_of, eval_noise_of, get_preset
from afm.training.data_config import CorpusConfig, SyntheticDataConfig
from afm.training.distill_config import NOT_IN_FINGERPRINT, DistillConfig
from afm.validation import check_bool, check_int, check_real, fail

logger = logging.getLogger(__name__)

__all__ = [
    "ConfigError",
    "EvalConfig",
    "RunConfig",
    "MODEL_DEFAULTS",
    "build_run_config",
    "coerce_fields",
    "data_config_from",
    "parse_set",
    "load_yaml",
]


class ConfigError(ValueError):
    """An invalid key or value in a run configuration (message names it)."""


@dataclass(frozen=True)
class EvalConfig:
    """The before/after table on the model's bundled tasks (toy world for ``tiny``)."""

    enabled: bool = True
    preset: str | None = None
    """Chip of the evaluation (input/output quantization); None: the training preset."""
    noise: str | None = None
    """Deployment noise model (``afm.analog.noise.get_noise_model`` name); None: the chip
    preset's own evaluation noise (``afm.presets.eval_noise_of``), else PCM."""
    noise_scale: float | None = None
    """Scale of the noise; None: the preset's (e.g. 3 for ``tiny-stress``)."""
    seeds: int = 3
    n_per_kind: int = 25
    """Arithmetic test problems per (digits, op) kind."""
    facts: bool = True
    calibration_batches: int = 8
    """Input-range calibration batches for the analog teacher baseline."""
    curve_scales: list[float] = field(default_factory=list)
    """Noise scales of an extra robustness curve (empty: none)."""

    def __post_init__(self) -> None:
        for name in ("enabled", "facts"):
            check_bool("eval", name, getattr(self, name))
        for name in ("preset", "noise"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                fail("eval", name, getattr(self, name), "must be a name or None")
        check_int("eval", "seeds", self.seeds, minimum=1)
        check_int("eval", "n_per_kind", self.n_per_kind, minimum=1)
        check_int("eval", "calibration_batches", self.calibration_batches, minimum=1)
        if self.noise_scale is not None:
            check_real("eval", "noise_scale", self.noise_scale)
        if not isinstance(self.curve_scales, list) or not all(
            not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x >= 0
            for x in self.curve_scales
        ):
            fail("eval", "curve_scales", self.curve_scales, "must be a list of finite numbers >= 0")


@dataclass(frozen=True)
class RunConfig:
    model: str
    output: str
    preset: str = "afm-paper"
    analog_head: bool | None = None
    """The output head's policy (spec §7): analog and noisy (True) or digital and
    noise-free (False); None: the preset's (``afm.presets.analog_head_of``)."""
    preset_overrides: dict[str, Any] = field(default_factory=dict)
    """``{"weight_noise.std": 0.08, ...}``: fields of the preset changed for this run
    (``afm.config.set_by_path`` paths); they apply to the evaluation chip too when
    ``eval.preset`` is None."""
    placement: str | None = None
    """An afm placement file (``afm-plan place``): only its layers become analog in the
    student (and in the analog teacher of the report); the others stay digital.  It must
    have been planned on this run's student chip (``preset`` + ``preset_overrides``) and
    decides the head (it lists it or not): ``analog_head`` stays unset."""
    data_dir: str | None = None
    """Token rows to train on: an afm data directory or any ``save_to_disk`` dataset
    with ``input_ids``; None: ``<output>/data`` (generated if missing)."""
    generate: bool = True
    """Generate missing synthetic data (False: ``data_dir`` must already hold it)."""
    num_threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    data: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    train: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def student_chip(self) -> AnalogConfig:
        """The student's ``AnalogConfig``: the preset with ``preset_overrides`` applied."""
        chip = get_preset(self.preset)
        for path, value in self.preset_overrides.items():
            try:
                chip = set_by_path(chip, str(path), value)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"preset_overrides: {path}={value!r}: {err}") from None
        return chip

    def student_placement(self) -> AfmQuantizationConfig | None:
        """The placement file's afm config (None without one), checked against the chip."""
        if self.placement is None:
            return None
        try:
            placement = read_quantization_config(str(self.placement))
        except ValueError as err:
            raise ConfigError(f"placement: {err}") from None
        chip = self.student_chip()
        if placement.analog_config != chip:
            ours, theirs = chip.to_dict(), placement.analog_config.to_dict()
            diff = sorted(k for k in ours if ours[k] != theirs.get(k))
            raise ConfigError(
                f"placement {self.placement!r} was planned on another chip than preset "
                f"{self.preset!r} with these preset_overrides (differs in {', '.join(diff)})"
            )
        if placement.overrides or placement.modules is None:
            raise ConfigError(
                f"placement {self.placement!r}: afm-train takes a placement that lists its "
                "analog layers and has no per-layer config overrides (as afm-plan writes them)"
            )
        return placement

    def head_is_analog(self) -> bool:
        """The resolved head policy: ``analog_head``, else the preset's."""
        return analog_head_of(self.preset) if self.analog_head is None else self.analog_head

    def eval_chip(self) -> AnalogConfig:
        """The evaluation chip: ``eval.preset`` if set, else the student's chip."""
        return get_preset(self.eval.preset) if self.eval.preset else self.student_chip()

    def eval_noise(self) -> dict[str, Any]:
        """``get_noise_model`` kwargs: the chip preset's noise, then ``eval.*``."""
        noise: dict[str, Any] = eval_noise_of(self.eval.preset or self.preset)
        if self.eval.noise is not None and self.eval.noise != noise.get("name"):
            noise = {"name": self.eval.noise}
        if self.eval.noise_scale is not None:
            noise["scale"] = float(self.eval.noise_scale)
        return noise

    @property
    def eval_chip_name(self) -> str:
        if self.eval.preset:
            return self.eval.preset
        extra = ", ".join(f"{k}={v}" for k, v in self.preset_overrides.items())
        if self.placement:
            extra += (", " if extra else "") + f"placement {Path(self.placement).name}"
        return self.preset + (f" ({extra})" if extra else "")

    @property
    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir) if self.data_dir else Path(self.output) / "data"

    @property
    def corpus_dir(self) -> Path:
        """Where the packed corpus goes."""
        return Path(self.output) / "corpus"

    @property
    def uses_synthetic_data(self) -> bool:
        """False when the corpus alone feeds the run (``corpus.mix`` = 1)."""
        return not self.corpus.enabled or self.corpus.mix < 1.0

    def identity(self) -> dict[str, Any]:
        """What makes two runs "the same run" (the output dir may be reused)."""
        d = self.to_dict()
        d.pop("output")
        d.pop("num_threads")
        d.pop("eval")
        for k in NOT_IN_FINGERPRINT:
            d["train"].pop(k)  # max_steps may be raised: run.check_output_dir
        d["data"].pop("backend")
        d["corpus"].pop("streaming")
        return d


_SECTIONS = {
    "data": SyntheticDataConfig,
    "corpus": CorpusConfig,
    "train": DistillConfig,
    "eval": EvalConfig,
}
_TOP = {f.name for f in dataclasses.fields(RunConfig)} - set(_SECTIONS)

# Defaults per model alias (kept in sync with configs/train/<alias>.yaml; a test checks it).
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {
        "preset": "tiny-stress",  # afm-paper I/O, PCM x3: see afm/presets.py
        "num_threads": 1,  # small matrices: 1 thread is as fast, and robust on a busy machine
        "data": {
            "num_tokens": 98_304,
            "seq_len": 128,
            "sequences_per_shard": 256,
            "batch_size": 128,
            "temperature": 1.0,
        },
        "train": {
            "max_steps": 250,
            "per_device_batch_size": 16,
            "lr": 5e-4,
            "scale_lr_by_world_size": False,
            "warmup_ratio": 0.05,
            "weight_decay": 0.0,
            "calibration_batches": 10,
            "kd_chunk_size": 512,
            "save_steps": 100,
            "logging_steps": 10,
        },
        "eval": {"seeds": 3, "n_per_kind": 25},
    },
}


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys")
    return data


def parse_set(item: str) -> tuple[str, Any]:
    """``"train.lr=1e-4"`` → ``("train.lr", 0.0001)`` (the value is parsed as YAML)."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"--set {item!r} is invalid: expected key=value")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r} is invalid: empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key, value


def _merge(base: dict[str, Any], update: dict[str, Any], where: str) -> None:
    for k, v in update.items():
        if k in _SECTIONS:
            if not isinstance(v, dict):
                raise ConfigError(f"{where}: {k!r} must be a mapping of keys")
            names = {f.name for f in dataclasses.fields(_SECTIONS[k])}
            for kk, vv in v.items():
                if kk not in names:
                    raise ConfigError(
                        f"{where}: unknown key '{k}.{kk}'; allowed: {', '.join(sorted(names))}"
                    )
                base.setdefault(k, {})[kk] = vv
        elif k in _TOP:
            base[k] = v
        else:
            allowed = sorted(_TOP | set(_SECTIONS))
            raise ConfigError(f"{where}: unknown key {k!r}; allowed: {', '.join(allowed)}")


def _dotted(key: str, value: Any) -> dict[str, Any]:
    parts = key.split(".")
    if len(parts) == 1:
        return {key: value}
    if len(parts) == 2:
        return {parts[0]: {parts[1]: value}}
    raise ConfigError(f"--set {key!r}: keys have at most two parts (e.g. train.lr)")


def _as_whole_number(value: Any) -> Any:
    """``1e6`` (YAML reads it as the string "1e6") or ``1000000.0`` → 1000000; anything
    else unchanged, for the field's validator to judge."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def coerce_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """YAML gives ints for floats like ``1``, strings for ``1e-4`` and ``1e6``, and lists
    for tuples: normalise per field type (int fields take whole numbers written as
    floats, so ``data.num_tokens=1e6`` works)."""
    out = dict(values)
    for f in dataclasses.fields(cls):
        kind = str(f.type)
        if f.name in out and "int" in kind and "float" not in kind:
            if not isinstance(out[f.name], bool):
                whole = _as_whole_number(out[f.name])
                out[f.name] = whole if isinstance(whole, int) else out[f.name]
        if f.name in out and "float" in kind and isinstance(out[f.name], int):
            if not isinstance(out[f.name], bool):
                out[f.name] = float(out[f.name])
        if (
            f.name in out
            and isinstance(out[f.name], str)
            and "float" in str(f.type)
            and "str" not in str(f.type)
        ):
            try:
                out[f.name] = float(out[f.name])  # YAML reads "1e-4" as a string
            except ValueError:
                pass
    return out


def build_run_config(
    model: str | None,
    output: str | None,
    *,
    preset: str | None = None,
    config_file: str | None = None,
    sets: list[str] | None = None,
) -> RunConfig:
    """Resolve the layers of configuration into a validated :class:`RunConfig`."""
    raw: dict[str, Any] = {}
    file_data = load_yaml(config_file) if config_file else {}
    model_name = model or file_data.get("model")
    if not model_name:
        raise ConfigError("no model given: pass --model ALIAS_OR_PATH (or 'model:' in the YAML)")
    alias = str(model_name).strip().lower()
    if alias in MODEL_DEFAULTS:
        defaults = json.loads(json.dumps(MODEL_DEFAULTS[alias]))
        _merge(raw, defaults, f"defaults of {alias!r}")
    _merge(raw, file_data, f"config file {config_file!r}")
    raw["model"] = model_name
    if preset is not None:
        raw["preset"] = preset
    if output is not None:
        raw["output"] = output
    for item in sets or []:
        key, value = parse_set(item)
        _merge(raw, _dotted(key, value), f"--set {item!r}")
    if not raw.get("output"):
        raise ConfigError("no output directory given: pass --output DIR")
    kwargs: dict[str, Any] = {k: v for k, v in raw.items() if k in _TOP}
    try:
        for name, cls in _SECTIONS.items():
            kwargs[name] = cls(**coerce_fields(cls, raw.get(name, {})))
        cfg = RunConfig(**kwargs)
    except TypeError as err:
        raise ConfigError(str(err)) from None
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for name in ("model", "output", "preset"):
        if not isinstance(getattr(cfg, name), str):
            raise ConfigError(f"{name}={getattr(cfg, name)!r} is invalid: must be a string")
    try:
        get_preset(cfg.preset)
        if cfg.eval.preset is not None:
            get_preset(cfg.eval.preset)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not isinstance(cfg.preset_overrides, dict):
        raise ConfigError(
            f"preset_overrides={cfg.preset_overrides!r} is invalid: must be a mapping "
            "like {weight_noise.std: 0.08}"
        )
    cfg.student_chip()  # validates the overrides
    cfg.student_placement()  # validates the placement file against that chip
    try:
        noise = cfg.eval_noise()
        get_noise_model(noise["name"], **{k: v for k, v in noise.items() if k != "name"})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"eval noise: {err}") from None
    if cfg.num_threads is not None and (
        not isinstance(cfg.num_threads, int) or cfg.num_threads < 1
    ):
        raise ConfigError(f"num_threads={cfg.num_threads!r} is invalid: must be a positive int")
    if cfg.analog_head is not None and not isinstance(cfg.analog_head, bool):
        raise ConfigError(f"analog_head={cfg.analog_head!r} is invalid: must be true or false")
    if cfg.analog_head is not None and cfg.placement is not None:
        raise ConfigError(
            f"analog_head={cfg.analog_head!r} does not apply with placement: the placement "
            "file lists the output head among its analog layers or not"
        )
    if not isinstance(cfg.generate, bool):
        raise ConfigError(f"generate={cfg.generate!r} is invalid: must be true or false")
    if cfg.uses_synthetic_data and not cfg.generate and cfg.data_dir is None:
        raise ConfigError(
            "generate=false needs data to train on: set data_dir (existing token rows) "
            "or corpus.path (your own corpus)"
        )
    return cfg


def data_config_from(config_file: str | None, sets: list[str]) -> SyntheticDataConfig:
    """A :class:`SyntheticDataConfig` from the ``data:`` section of a run YAML (or a flat
    mapping) and ``--set KEY=VALUE`` items (``KEY`` bare or as ``data.KEY``)."""
    names = {f.name for f in dataclasses.fields(SyntheticDataConfig)}
    values: dict[str, Any] = {}
    if config_file:
        raw = load_yaml(config_file)
        section = raw.get("data", raw if not ({"train", "eval", "model"} & set(raw)) else {})
        if not isinstance(section, dict):
            raise ConfigError(f"config file {config_file!r}: 'data' must be a mapping")
        for k, v in section.items():
            if k not in names:
                raise ConfigError(f"config file {config_file!r}: unknown data key {k!r}")
            values[k] = v
    for item in sets:
        key, value = parse_set(item)
        key = key[5:] if key.startswith("data.") else key
        if key not in names:
            raise ConfigError(
                f"--set {item!r}: unknown key {key!r}; allowed: {', '.join(sorted(names))}"
            )
        values[key] = value
    try:
        return SyntheticDataConfig(**coerce_fields(SyntheticDataConfig, values))
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
