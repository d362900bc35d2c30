"""Evaluate afm models on a simulated chip: lm-eval tasks under deployment noise.

The building blocks behind ``afm-eval`` (see ``docs/evaluation.md``):

* ``specs`` — :class:`ModelSpec` (which model, converted / quantized how) and
  :class:`TaskSpec` (an lm-eval task with its few-shot count, metric, limit), suites;
* ``loading`` — :func:`load_model_spec`: load, quantize, convert, calibrate;
* ``conditions`` — :class:`Condition` (noise model per seed, config changes),
  :func:`make_conditions` (FP / noise / drift times); ``sweep`` — robustness axes;
* ``runners`` — :class:`LmEvalRunner` (any lm-eval task through the ``"afm"`` lm-eval
  model, ``lm_eval_model``) and :class:`ToyRunner` (toy-world fast path);
* ``loop`` — model × condition × seed, written once: :func:`run_evaluation`;
* ``ttc`` / ``ttc_sampling`` — test-time-compute scaling (majority vote, best-of-N);
* ``report`` — mean ± std tables, JSON and plots; ``command`` — ``afm-eval`` as a call.

``lm_eval`` is imported only when an :class:`LmEvalRunner` is built.
"""

from afm.evaluate.command import EvalRequest, run_eval_request
from afm.evaluate.conditions import Condition, analog_config_changes, make_conditions
from afm.evaluate.loading import check_model_spec, load_model_spec
from afm.evaluate.loop import Runner, chip_runs, programmed, run_evaluation, scores_under_noise
from afm.evaluate.report import EvalReport, ResultRow, load_report, mean_std
from afm.evaluate.runners import LmEvalRunner, ToyRunner, spread_indices
from afm.evaluate.specs import (
    EvalInputError,
    ModelSpec,
    TaskSpec,
    bundled_tasks_dir,
    load_suite,
    parse_tasks,
)

__all__ = [
    "Condition",
    "EvalInputError",
    "EvalReport",
    "EvalRequest",
    "LmEvalRunner",
    "ModelSpec",
    "ResultRow",
    "Runner",
    "TaskSpec",
    "ToyRunner",
    "analog_config_changes",
    "bundled_tasks_dir",
    "check_model_spec",
    "chip_runs",
    "load_model_spec",
    "load_report",
    "load_suite",
    "make_conditions",
    "mean_std",
    "parse_tasks",
    "programmed",
    "run_eval_request",
    "run_evaluation",
    "scores_under_noise",
    "spread_indices",
]
