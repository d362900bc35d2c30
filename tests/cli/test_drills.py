"""The two drills end to end, small (slow suite): scripts/fault_drill.py survives every
fault it injects with nothing lost; scripts/bad_input_drill.py counts its cases."""

from __future__ import annotations

import pytest
from helpers import load_script


@pytest.mark.slow
def test_fault_drill_small(capsys):
    drill = load_script("fault_drill")
    rc = drill.main(["--faults", "4", "--seed", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    line = next(ln for ln in out.splitlines() if ln.startswith("faults injected"))
    injected = int(line.split()[2])
    assert (
        injected >= 3 and line == f"faults injected {injected} / survived {injected} / data lost 0"
    )
    assert "final model vs the uninterrupted run: bitwise equal" in out


@pytest.mark.slow
def test_bad_input_drill_runs_its_cases_in_subprocesses(capsys):
    drill = load_script("bad_input_drill")
    rc = drill.main(["--only", "train lr"])  # lr=inf, lr_end >= lr, lr_power=nan
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "tried 3 / clean errors 3 / tracebacks 0 / silently accepted 0" in out
