"""``afm-lm-eval``: lm-eval's own CLI with afm's ``--model afm`` registered.

Every lm-eval flag works as in ``lm_eval`` / ``lm-eval`` (this is that CLI); afm adds the
model ``afm`` and its model args (``afm.evaluate.lm_eval_model.AfmLM``)::

    afm-lm-eval --model afm --tasks toyworld_arith --limit 20 \\
        --model_args pretrained=runs/tiny,noise=pcm,noise_seed=3,drift=1d
    afm-lm-eval run --model afm --model_args pretrained=tiny,preset=afm-paper \\
        --tasks hellaswag --output_path results/
    afm-lm-eval ls tasks

``pretrained`` is an afm checkpoint, an alias (``tiny``), a directory or a hub id;
``preset`` (convert a plain model on the fly; ``calib``, ``calib_steps``), ``rtn_w4``,
``group_size``, ``noise`` / ``noise_seed`` / ``noise_scale`` / ``drift`` (program the chip
once).  afm's bundled tasks (``toyworld_*``) are found without ``--include_path``;
passing ``--include_path DIR`` replaces them with ``DIR`` (lm-eval takes one directory).
Errors in afm's model args print one line ``afm-lm-eval: error: ...`` (exit 2).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from afm.cli.common import run_cli

PROG = "afm-lm-eval"
_SUBCOMMANDS = ("run", "ls", "validate")


def _argv(argv: Sequence[str]) -> list[str]:
    """lm-eval's argv with afm's bundled task directory added to a ``run``."""
    from afm.evaluate.specs import bundled_tasks_dir

    args = list(argv)
    is_run = bool(args) and (args[0] == "run" or args[0] not in _SUBCOMMANDS)
    if is_run and "--include_path" not in args and not any(a in ("-h", "--help") for a in args):
        args += ["--include_path", str(bundled_tasks_dir())]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from lm_eval.__main__ import cli_evaluate

    import afm.evaluate.lm_eval_model  # noqa: F401 - registers --model afm

    args = _argv(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = [PROG, *args]  # lm-eval's CLI parses sys.argv itself

    def run() -> int:
        cli_evaluate()
        return 0

    try:
        return run_cli(PROG, run)
    except SystemExit as exc:  # argparse (--help, usage errors) and lm-eval's own exits
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
