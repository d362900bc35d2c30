"""Reward functions for GRPO on an analog base (``afm-lora --mode grpo --reward ...``).

A reward function has TRL's signature: ``fn(prompts, completions, **columns) ->
list[float | None]`` with one entry per completion; ``columns`` are the dataset's other
columns (e.g. ``answer``), one value per completion.  Rewards are given by

* a bundled name: ``exact-match`` (:func:`exact_match_reward`, the toy world's
  ``Answer: <int>`` against the ``answer`` column);
* an import path ``pkg.module:function``, or a file ``path/to/rewards.py:function``.

Every function is wrapped by :class:`CheckedReward`, which turns a wrong result (not a
list, wrong length, not a number) into a :class:`RewardError` naming the function, and
:func:`probe_rewards` calls each once on two dataset rows before any model is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from afm.toyworld.scoring import parse_answer

__all__ = [
    "REWARDS",
    "CheckedReward",
    "RewardError",
    "call_reward",
    "exact_match_reward",
    "load_reward",
    "probe_rewards",
]

RewardFn = Callable[..., Sequence[float | None]]


class RewardError(ValueError):
    """A reward function that cannot be imported or returns the wrong thing."""


def _text(completion: Any) -> str:
    """A completion as text: a string, or a conversational ``[{"role", "content"}]``."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        return str(completion[-1].get("content", ""))
    return str(completion)


def exact_match_reward(completions: Sequence[Any], answer: Sequence[Any], **_: Any) -> list[float]:
    """1.0 where the completion's first line states ``Answer: <the answer>``, else 0.0.

    The first line only, as :func:`afm.toyworld.scoring.evaluate_arith` scores greedy
    answers: a correct answer after a wrong one does not count.
    """
    out = []
    for completion, ref in zip(completions, answer, strict=True):
        got = parse_answer(_text(completion).split("\n")[0])
        out.append(float(got is not None and str(got) == str(ref).strip()))
    return out


#: Bundled rewards by name (and the dataset column each needs).
REWARDS: dict[str, tuple[RewardFn, tuple[str, ...]]] = {
    "exact-match": (exact_match_reward, ("answer",)),
}


class CheckedReward:
    """A reward function whose every result is checked (one ``float | None`` per
    completion); keeps the wrapped function's ``__name__`` (TRL logs rewards by it)."""

    def __init__(self, fn: RewardFn, spec: str, columns: tuple[str, ...] = ()) -> None:
        self.fn = fn
        self.spec = spec
        self.columns = columns
        self.__name__ = getattr(fn, "__name__", spec.replace(":", "."))

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any):
        try:
            out = self.fn(prompts=prompts, completions=completions, **kwargs)
        except RewardError:
            raise
        except Exception as err:  # noqa: BLE001 - one line naming the function
            raise RewardError(f"reward {self.spec!r} raised {type(err).__name__}: {err}") from err
        return self.check(out, len(completions))

    def check(self, out: Any, n: int) -> list[float | None]:
        if hasattr(out, "tolist"):  # a tensor or an array
            out = out.tolist()
        if isinstance(out, (str, bytes)) or not isinstance(out, Sequence):
            raise RewardError(
                f"reward {self.spec!r} returned {type(out).__name__}; expected a list of "
                f"{n} floats (one per completion)"
            )
        if len(out) != n:
            raise RewardError(
                f"reward {self.spec!r} returned {len(out)} values for {n} completions; "
                "expected one float (or None) per completion"
            )
        values: list[float | None] = []
        for i, v in enumerate(out):
            if v is None:
                values.append(None)
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise RewardError(
                    f"reward {self.spec!r} returned {v!r} at position {i}; expected a finite "
                    "float or None"
                )
            values.append(float(v))
        return values


def _from_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise RewardError(f"reward {spec!r}: file {str(path)!r} not found")
    mod_spec = importlib.util.spec_from_file_location(f"afm_reward_{path.stem}", path)
    if mod_spec is None or mod_spec.loader is None:
        raise RewardError(f"reward {spec!r}: cannot import {str(path)!r}")
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001
        raise RewardError(f"reward {spec!r}: importing {path} raised {err!r}") from err
    return module


def load_reward(spec: str) -> CheckedReward:
    """A bundled reward by name, ``pkg.module:function`` or ``file.py:function``."""
    spec = spec.strip()
    if spec in REWARDS:
        fn, cols = REWARDS[spec]
        return CheckedReward(fn, spec, cols)
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise RewardError(
            f"reward {spec!r} is neither a bundled reward ({', '.join(REWARDS)}) nor an "
            "import path 'pkg.module:function' / 'file.py:function'"
        )
    if target.endswith(".py"):
        module = _from_file(Path(target).expanduser(), spec)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as err:  # noqa: BLE001 - ImportError or an error in the module
            raise RewardError(f"reward {spec!r}: cannot import {target!r} ({err})") from err
    fn = getattr(module, attr, None)
    if fn is None:
        raise RewardError(f"reward {spec!r}: {target!r} has no attribute {attr!r}")
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return CheckedReward(fn, spec)


def probe_rewards(rewards: Sequence[CheckedReward], rows: Sequence[Mapping[str, Any]]) -> None:
    """Call every reward once on ``rows`` (dataset rows with a ``prompt``), with each row's
    reference answer (``completion`` / ``answer`` column, else empty) as the completion.

    Catches a function that raises, needs a missing column, or returns the wrong shape
    before a model is loaded; the values themselves are not judged.
    """
    if not rows:
        raise RewardError("no dataset rows to check the reward functions on")
    for reward in rewards:
        missing = [c for c in reward.columns if c not in rows[0]]
        if missing:
            raise RewardError(
                f"reward {reward.spec!r} needs the dataset column(s) {missing}; the dataset "
                f"has {sorted(rows[0])}"
            )
        completions = [
            str(r.get("completion", "Answer: " + str(r.get("answer", "")))) for r in rows
        ]
        call_reward(reward, rows, completions)


def call_reward(
    reward: CheckedReward, rows: Sequence[Mapping[str, Any]], completions: Sequence[Any]
) -> list[float | None]:
    """``reward`` on ``completions`` of ``rows`` with the keyword arguments TRL passes
    (the rows' other columns; ``trainer_state`` None outside training)."""
    columns = {k: [r[k] for r in rows] for k in rows[0] if k not in ("prompt", "completion")}
    return reward(
        prompts=[r["prompt"] for r in rows],
        completions=list(completions),
        completion_ids=[[] for _ in rows],
        trainer_state=None,
        log_extra=_ignore,
        log_metric=_ignore,
        **columns,
    )


def _ignore(*_: Any, **__: Any) -> None:
    return None
