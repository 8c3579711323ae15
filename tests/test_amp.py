"""train.amp: auto (the default), true, false: which autocast precision each resolves to, from the
CPU's flags as input, and how configs are checked before any device is known."""

import platform

import pytest
import torch

CPU = torch.device("cpu")
# /proc/cpuinfo flags of a CPU without native bf16 (AVX-512 but no BF16 extension, e.g. Skylake-SP)
# and of two with it (Cooper Lake's AVX512-BF16, Sapphire Rapids' AMX).
NO_BF16 = {"fpu", "sse4_2", "avx2", "avx512f", "avx512bw", "avx512_vnni"}
AVX512_BF16 = NO_BF16 | {"avx512_bf16"}
AMX = NO_BF16 | {"amx_tile", "amx_bf16"}


@pytest.mark.parametrize(
    "amp, flags, expected",
    [
        ("auto", NO_BF16, None),  # emulated bf16 would be slower than fp32
        ("auto", AVX512_BF16, torch.bfloat16),
        ("auto", AMX, torch.bfloat16),
        ("auto", set(), None),  # no flags at all (not Linux, or an ARM CPU): fp32
        (True, NO_BF16, torch.bfloat16),  # asked for: bf16 even where it is emulated
        (True, AMX, torch.bfloat16),
        (False, AMX, None),
    ],
)
def test_cpu_precision_rule(amp, flags, expected):
    from trainer.device import amp_dtype

    assert amp_dtype(CPU, amp, flags) == expected


def test_native_bf16_needs_one_of_the_two_flags():
    from trainer.device import native_bf16_cpu

    assert not native_bf16_cpu(NO_BF16) and not native_bf16_cpu(NO_BF16 | {"amx_tile", "amx_int8"})
    assert native_bf16_cpu(AVX512_BF16) and native_bf16_cpu(AMX) and native_bf16_cpu(["amx_bf16"])


def test_flags_come_from_this_cpu():
    from trainer.device import amp_choice, amp_dtype, cpu_flags, native_bf16_cpu, precision_name

    flags = cpu_flags()
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        assert {"fpu", "sse2"} <= flags  # every x86-64 CPU has these: the flags line was read
    expected = "bf16" if native_bf16_cpu(flags) else "fp32"
    assert precision_name(amp_dtype(CPU, "auto")) == expected
    assert amp_choice(CPU, "auto").startswith(f"{expected} (train.amp=auto: ")
    assert amp_choice(CPU, False) == "fp32 (train.amp=false)"


def test_an_unknown_setting_is_refused():
    from trainer.device import amp_dtype

    with pytest.raises(ValueError, match="train.amp: expected true, false or 'auto', got 'yes'"):
        amp_dtype(CPU, "yes")


@pytest.mark.parametrize("text, value", [("", "auto"), ("auto", "auto"), ("true", True), ("false", False)])
def test_config_reads_auto_true_false(text, value, tmp_path):
    from trainer.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("model: {arch: resnet9_tiny}\n" + (f"train: {{amp: {text}}}\n" if text else ""))
    assert load_config(path).train.amp == value
    assert load_config(path, [f"train.amp={str(value).lower()}"]).train.amp == value


@pytest.mark.parametrize("bad", ["1", "Auto", "bf16", "null"])
def test_config_refuses_other_values(bad):
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.arch=resnet9_tiny", f"train.amp={bad}"])
    message = str(info.value)
    assert "train.amp: expected true/false or one of 'auto'" in message and "\n" not in message


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_batches_with_auto_are_refused_on_every_machine(dtype):
    # auto turns autocast off on CPUs without native bf16, where half-precision batches would meet
    # float32 weights. Whether it does depends on the machine, so the combination is refused at
    # load time everywhere: the launcher on a login node refuses what a compute node could not run.
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.arch=resnet9_tiny", f"data.dtype={dtype}"])  # train.amp: auto, the default
    message = str(info.value)
    assert "\n" not in message
    assert f"data.dtype={dtype} needs autocast, but train.amp=auto runs the network in float32 on CPUs" in message
    assert "set data.dtype=float32 (or train.amp=true)" in message
    assert load_config(None, ["model.arch=resnet9_tiny", f"data.dtype={dtype}", "train.amp=true"]).train.amp is True


def test_every_shipped_config_resolves():
    # speed.yaml hands out bf16 batches and so keeps amp: true; the others follow auto.
    from trainer.config import load_config
    from trainer.launch import CONFIGS

    amps = {p.stem: load_config(p, ["model.arch=resnet9_tiny"]).train.amp for p in sorted(CONFIGS.glob("*.yaml"))}
    for stem in ("speed", "speed-resnet9", "airbench94"):  # airbench94.yaml is speed.yaml
        assert amps.pop(stem) is True, stem
    assert set(amps.values()) == {"auto"}, amps
