"""Shared CLI plumbing, one convention for all afm commands.

Bad input is one line on stderr, ``afm-<cmd>: error: <what is wrong>``, exit status 2
(usage errors from argparse too).  A run that cannot go on correctly (training that
diverged: :class:`afm.training.guard.TrainingStopped`) is one line too, exit status 1.
``AFM_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence


class CliError(Exception):
    """A user error the CLI reports as one line (exit status 2)."""


def _user_errors() -> tuple[type[BaseException], ...]:
    # Every afm error for bad input is one of these (ConfigError, DataError,
    # EvalInputError and friends are ValueErrors; ModelNotFoundError is an OSError);
    # ImportError: an optional extra is missing (the message names it).
    return (CliError, ValueError, OSError, ImportError)


def _run_failures() -> tuple[type[BaseException], ...]:
    # Imported here: afm.training pulls in torch, which `--help` does not need.
    from afm.training.guard import TrainingStopped

    return (TrainingStopped,)


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def run_cli(prog: str, fn: Callable[[], int]) -> int:
    """Run ``fn``; user errors → ``prog: error: <one line>`` on stderr and exit 2.

    ``AFM_DEBUG=1`` re-raises (full traceback) for debugging.
    """
    try:
        return fn()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as err:
        if os.environ.get("AFM_DEBUG"):
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        if os.environ.get("AFM_DEBUG") or not isinstance(err, _run_failures()):
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 1


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if quiet:  # transformers' own bars ("Loading weights") too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def cli_main(
    prog: str,
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    fn: Callable[[argparse.Namespace], int],
) -> int:
    """Parse ``argv`` and run ``fn(args)`` under :func:`run_cli`; returns the exit status
    (0 for ``--help``, 2 for a usage error, already printed as one line) instead of
    raising ``SystemExit``, so in-process callers get the same status as a shell."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return run_cli(prog, lambda: fn(args))


def make_parser(prog: str, description: str, **kwargs) -> argparse.ArgumentParser:  # noqa: ANN003
    """An ``argparse`` parser whose usage errors are one line too."""

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            print(f"{prog}: error: {message} (see {prog} --help)", file=sys.stderr)
            raise SystemExit(2)

    return _Parser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kwargs,
    )
