"""Issue 15 §2: an export ``skip`` pattern that matches no layer is an error.

Before, ``afm-export --skip no_such_layer`` replaced the default skip list with a name
that matches nothing, and silently quantized the output head (the CLI case is in
``test_export.py::test_cli_exports_saved_model``).
"""

from __future__ import annotations

import pytest

import afm

pytest.importorskip("compressed_tensors")

from afm.export import export_int4  # noqa: E402


def test_library_skip_typo_is_an_error_and_writes_nothing(tiny_model, tmp_path):
    model = afm.convert(tiny_model("llama"), afm.get_preset("afm-paper"))
    with pytest.raises(ValueError, match=r"skip: 'lm_haed' \(closest: lm_head"):
        export_int4(model, tmp_path / "out", skip=("lm_haed",))
    assert not (tmp_path / "out").exists()
