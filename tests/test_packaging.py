"""The kernels folder is installed as afm.triton_kernels and never shadows the
top-level `triton_kernels` that vLLM / Triton ship."""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_installed_import_names():
    spec = importlib.util.find_spec("afm.triton_kernels")
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).parent.name == "triton_kernels"
    tasks = importlib.util.find_spec("afm.tasks")
    assert tasks is not None
    # From a neutral directory, afm provides no top-level `triton_kernels`.
    code = (
        "import importlib.util, pathlib; s = importlib.util.find_spec('triton_kernels'); "
        f"print('none' if s is None else ('ours' if pathlib.Path(s.origin or '').is_relative_to("
        f"{str(ROOT)!r}) else 'other'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() in ("none", "other")


@pytest.mark.slow
def test_wheel_maps_kernels_into_afm(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("afm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "afm/triton_kernels/__init__.py" in names
    assert not any(n.startswith("triton_kernels/") for n in names)
    assert any(n.startswith("afm/tasks/") and n.endswith(".yaml") for n in names)
    assert "afm/suites/afm_paper.yaml" in names
    assert "afm/tasks/toyworld/arith.jsonl" in names
    if (ROOT / "afm" / "assets" / "tiny" / "config.json").exists():
        assert "afm/assets/tiny/config.json" in names
        assert any(n.endswith(".safetensors") for n in names)
    # Install it into an isolated target and import the kernels package from there.
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    code = (
        "import importlib.util; s = importlib.util.find_spec('afm.triton_kernels'); "
        "print(s.origin); print(importlib.util.find_spec('triton_kernels'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(target)!r}); " + code],
        cwd="/",
        capture_output=True,
        text=True,
    )
    lines = out.stdout.strip().splitlines()
    assert lines and lines[0].startswith(str(target / "afm" / "triton_kernels")), out.stderr
    assert lines[1] == "None"
