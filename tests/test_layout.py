"""The package layout keeps its rules (scripts/check_layout.py), ``import afm`` stays light,
and the old import paths users wrote keep working."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import REPO

_spec = importlib.util.spec_from_file_location("check_layout", REPO / "scripts/check_layout.py")
check_layout = importlib.util.module_from_spec(_spec)
sys.modules["check_layout"] = check_layout  # dataclasses look their module up
_spec.loader.exec_module(check_layout)

HEAVY = ("triton", "peft", "lm_eval", "vllm", "numba", "deepspeed", "trl")


def test_the_layout_has_no_problems():
    assert check_layout.check() == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in {"afm/__init__.py": "", **files}.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


@pytest.mark.parametrize(
    "files, needle",
    [
        (
            {"afm/a.py": "import afm.b\n", "afm/b.py": "def f():\n    import afm.a\n"},
            "import cycle: afm.a -> afm.b",
        ),
        ({"afm/a.py": "def _h(): ...\n", "afm/b.py": "from afm.a import _h\n"}, "private _h"),
        ({"afm/b.py": "import afm\n"}, "imports afm (the facade"),
        ({"afm/b.py": "from afm import convert\n"}, "imports afm (the facade"),
        ({"afm/noise.py": "", "afm/b.py": "from afm.noise import x\n"}, "old-path alias"),
        (
            {
                "afm/config.py": "import afm.analog.x\n",
                "afm/analog/__init__.py": "",
                "afm/analog/x.py": "",
            },
            "dependencies run downwards",
        ),
        ({"afm/b.py": "def __getattr__(name): ...\n"}, "__getattr__"),
        ({"afm/b.py": "x = 1\n" * 501}, "501 lines"),
        ({"afm/b.py": "import afm.nope\n"}, "does not exist"),
    ],
)
def test_each_rule_fails_when_broken(tmp_path, files, needle):
    problems = check_layout.check(_tree(tmp_path, files))
    assert any(needle in p for p in problems), problems


def test_the_script_exits_nonzero_on_a_problem(tmp_path):
    root = _tree(tmp_path, {"afm/a.py": "import afm.b\n", "afm/b.py": "import afm.a\n"})
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts/check_layout.py"), "--root", str(root)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1 and "import cycle" in run.stdout
    ok = subprocess.run([sys.executable, str(REPO / "scripts/check_layout.py")], text=True)
    assert ok.returncode == 0


def test_import_afm_is_light():
    code = f"import sys, afm; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "old, name, new",
    [
        ("afm.layers", "AnalogLinear", "afm.analog.layers"),
        ("afm.patch", "convert", "afm.analog.convert"),
        ("afm.noise", "apply_noise_", "afm.analog.noise"),
        ("afm.hf", "AfmQuantizationConfig", "afm.analog.hf"),
    ],
)
def test_old_module_paths_still_work_and_name_the_new_one(old, name, new):
    code = (
        "import warnings; warnings.simplefilter('always');\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        f"    from {old} import {name} as got\n"
        f"from {new} import {name} as want\n"
        "print(got is want, [str(x.message) for x in w if x.category is DeprecationWarning])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("True") and new in out.stdout, out.stdout


def test_old_package_paths_keep_their_names():
    import afm.evaluate
    import afm.export
    import afm.lora
    from afm import toyworld

    for module, names in [
        (afm.evaluate, ["ModelSpec", "TaskSpec", "Condition", "run_evaluation", "LmEvalRunner"]),
        (afm.export, ["export_int4", "ExportSummary", "find_adapter_layers"]),
        (afm.lora, ["attach_lora", "load_adapter", "train_adapter", "evaluate_under_noise"]),
        (toyworld, ["arith_problems", "evaluate_arith", "training_documents"]),
    ]:
        missing = [n for n in names if not hasattr(module, n)]
        assert not missing, (module.__name__, missing)
