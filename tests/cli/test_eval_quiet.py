"""``afm-eval --quiet`` is quiet: no bars, no warnings (lm-eval's included) on stderr."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")


def test_afm_eval_quiet_prints_nothing_on_stderr(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TQDM_DISABLE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "afm.cli.evaluate", "--model", "tiny", "--tasks",
         "toyworld_arith", "--limit", "2", "--seeds", "1", "--noise", "pcm", "--threads", "1",
         "--quiet", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ""
    assert proc.stdout.splitlines() == [
        f"wrote markdown: {tmp_path / 'eval.md'}",
        f"wrote json: {tmp_path / 'eval.json'}",
    ]
