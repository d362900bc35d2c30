"""Shared CLI plumbing: one clear error line instead of a traceback for bad input."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable


class CliError(Exception):
    """A user error the CLI reports as one line (exit status 2)."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from afm.data import DataError
    from afm.models import ModelNotFoundError
    from afm.train_config import ConfigError

    return (CliError, ConfigError, DataError, ModelNotFoundError, ValueError, OSError)


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


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def make_parser(prog: str, description: str):  # noqa: ANN201
    """An ``argparse`` parser whose usage errors are one line too."""
    import argparse

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            print(f"{prog}: error: {message} (see {prog} --help)", file=sys.stderr)
            raise SystemExit(2)

    return _Parser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
