"""The restricted unpickler: aihwkit-lightning configs in, nothing else, nothing run."""

import io
import os
import pickle
import pickletools
from collections import OrderedDict

import pytest
import torch

from afm.interop import UnsafePickleError, import_ibm_afm, load_rpu_config
from afm.interop.state import read_state_dict
from afm.interop.unpickle import PickledEnum, PickledObject, RestrictedUnpickler, plain

dill = pytest.importorskip("dill", reason="dill is not installed")


class _Touch:
    """A pickle payload that would run a shell command when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evaluates:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_reads_dill_pickles_of_every_protocol(rpu_config, tmp_path, protocol):
    cfg = rpu_config(max_input_size=256)
    path = tmp_path / "rpu_config"
    path.write_bytes(dill.dumps(cfg, protocol=protocol))
    obj = load_rpu_config(path)
    assert isinstance(obj, PickledObject) and obj.class_name == "TorchInferenceRPUConfig"
    assert obj.fields["mapping"].fields == {"max_input_size": 256}
    assert obj.fields["clip"].fields["type"] == PickledEnum(
        "WeightClipType", "LayerGaussianPerChannel"
    )
    assert plain(obj)["pre_post"]["input_range"]["init_std_alpha"] == 18.0


def test_dill_writes_only_standard_opcodes_for_the_config(rpu_config):
    """What the allowlist is built on: dill's default protocol emits no dill reconstructors."""
    names = {
        arg for op, arg, _ in pickletools.genops(dill.dumps(rpu_config())) if isinstance(arg, str)
    }
    assert not any("dill" in n for n in names)
    opcodes = {op.name for op, _, _ in pickletools.genops(dill.dumps(rpu_config()))}
    assert {"STACK_GLOBAL", "NEWOBJ", "BUILD", "REDUCE"} <= opcodes
    assert not opcodes & {"INST", "OBJ", "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"}


@pytest.mark.parametrize("nest", [False, True])
def test_rpu_config_that_runs_a_command_is_refused(rpu_config, tmp_path, nest):
    marker = tmp_path / "pwned"
    payload = _Touch(marker)
    if nest:  # hidden inside an otherwise valid config
        payload, cfg = rpu_config(), payload
        payload.forward = cfg
    path = tmp_path / "rpu_config"
    path.write_bytes(dill.dumps(payload))
    with pytest.raises(UnsafePickleError, match=r"rpu_config: refused to load 'posix.system'"):
        load_rpu_config(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "data",
    [
        pickle.dumps(_Evaluates()),
        b"cbuiltins\ngetattr\n(cbuiltins\nobject\nS'__subclasses__'\ntR.",
        b"(ios\nsystem\nS'true'\n.",  # INST opcode
    ],
)
def test_other_globals_are_refused(data):
    with pytest.raises(UnsafePickleError, match="refused to load"):
        RestrictedUnpickler(io.BytesIO(data)).load()


def test_allowlisted_names_cannot_be_misused(tmp_path):
    cls = b"caihwkit_lightning.simulator.parameters.io\nIOParameters\n"
    with pytest.raises(UnsafePickleError, match="built with arguments"):  # REDUCE with args
        RestrictedUnpickler(io.BytesIO(cls + b"(S'x'\ntR.")).load()
    recon = b"ccopy_reg\n_reconstructor\n(cbuiltins\nstr\nN\ntR."  # a real class as target
    with pytest.raises(UnsafePickleError, match="refused to load 'builtins.str'"):
        RestrictedUnpickler(io.BytesIO(recon)).load()
    path = tmp_path / "rpu_config"
    path.write_bytes(pickle.dumps({"not": "a config"}))
    with pytest.raises(
        UnsafePickleError, match="expected an aihwkit-lightning TorchInferenceRPUConfig"
    ):
        load_rpu_config(path)


def test_state_dict_that_runs_a_command_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "x": _Touch(marker)}, path)
    with pytest.raises(
        UnsafePickleError, match=r"pytorch_model.bin: refused to unpickle .*posix.system"
    ):
        read_state_dict([path])
    state = OrderedDict(w=torch.zeros(2))  # hidden in the metadata, where rpu_configs live
    state._metadata = {"lm_head": {"version": 1, "rpu_config": _Touch(marker)}}
    torch.save(state, path)
    with pytest.raises(UnsafePickleError, match="posix.system"):
        read_state_dict([path])
    assert not marker.exists()


def test_import_refuses_either_file_and_writes_nothing(lightning_checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = lightning_checkpoint("llama")
    good = (ckpt.path / "rpu_config").read_bytes()
    (ckpt.path / "rpu_config").write_bytes(dill.dumps(_Touch(marker)))
    with pytest.raises(UnsafePickleError, match="rpu_config: refused"):
        import_ibm_afm(ckpt.path, tmp_path / "a")
    (ckpt.path / "rpu_config").write_bytes(good)
    state = ckpt.model.state_dict()
    state["model.norm.weight"] = _Touch(marker)
    torch.save(state, ckpt.path / "pytorch_model.bin")
    with pytest.raises(UnsafePickleError, match="pytorch_model.bin: refused"):
        import_ibm_afm(ckpt.path, tmp_path / "b")
    assert not marker.exists()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_embedded_rpu_configs_are_read_as_plain_data(lightning_checkpoint):
    ckpt = lightning_checkpoint("llama")
    state = read_state_dict([ckpt.path / "pytorch_model.bin"])
    assert set(state.embedded_configs) == {"pytorch_model.bin:model", "pytorch_model.bin:lm_head"}
    for obj in state.embedded_configs.values():
        assert isinstance(obj, PickledObject) and obj.class_name == "TorchInferenceRPUConfig"
