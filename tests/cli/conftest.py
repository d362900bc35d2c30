"""Fixtures of the CLI tests: the bad-input drill's models, damaged files and data."""

from __future__ import annotations

import sys

import pytest
from helpers import load_script


@pytest.fixture(scope="session")
def drill():
    return sys.modules.get("afm_script_bad_input_drill") or load_script("bad_input_drill")


@pytest.fixture(scope="session")
def fixtures(drill, tmp_path_factory):
    """Paths of the drill's fixtures (tiny models, a truncated checkpoint, bad data ...)."""
    return drill.build_fixtures(tmp_path_factory.mktemp("drill") / "fixtures")


@pytest.fixture(autouse=True)
def _restore_threads():
    """The CLIs set torch's thread count (``num_threads``, ``--threads``): restore it."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
