"""Issue 15 §5: every bad input of the drill's table (scripts/bad_input_drill.py) is one
line ``afm-<cmd>: error: ...`` naming the field, file or value, exit status 2, and
nothing is written.  Library entry points raise a ValueError / OSError naming it."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from helpers import load_script

DRILL = load_script("bad_input_drill")
CASES = DRILL.CASES
#: The hub's offline switch is read when huggingface_hub is imported: a fresh process.
IN_SUBPROCESS = {"eval hub task while offline"}


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_is_one_clean_line(case, fixtures, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    root = Path(fixtures["model"]).parent
    before = _tree(root)
    if case.target == "library":
        verdict, detail = DRILL.judge_library(lambda: case.call({**fixtures, "out": out}))
    elif case.name in IN_SUBPROCESS:
        result = DRILL.run_cli_case(case, fixtures, out, timeout=600)
        verdict, detail = result.verdict, result.detail
    else:
        for key, value in case.env:
            monkeypatch.setenv(key, value)
        main = importlib.import_module(DRILL.MODULES[case.target]).main
        rc = main(DRILL.expand(case, fixtures, out))
        verdict, detail = DRILL.judge_cli(case.target, rc, capsys.readouterr().err)
    assert verdict == "clean", detail
    assert case.needle in detail
    assert not Path(out).exists(), "a refused command wrote its output"
    assert _tree(root) == before, "a refused command changed its inputs"


def test_the_table_covers_every_cli_and_the_library():
    targets = {c.target for c in DRILL.CASES}
    assert targets == {*DRILL.MODULES, "library"}
    names = [c.name for c in DRILL.CASES]
    assert len(names) == len(set(names))
