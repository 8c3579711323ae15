"""The model registry and every network in it (parametrised over the registry, as timm does)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from torch import nn

from helpers import REPO
from trainer import models
from trainer.models.__main__ import within_target
from trainer.models.flops import count_params

NAMES = models.names()

EXPECTED_SEED = {
    "alexnet": "AlexNet",
    "vgg_bn": "VGG+BN",
    "inception_bn": "Inception+BN",
    "resnet": "ResNet",
    "mobilenet": "MobileNet",
    "mobilenet_big": "MobileNetBig",
    "efficientnet": "EfficientNet",
}
EXPECTED_EXTRA = {"airbench94", "efficientnet_b0", "resnet9", "resnet9_tiny"}


@pytest.fixture(scope="module")
def built() -> Callable[[str], nn.Module]:
    """Build each network once per module: the big ones (VGG 33 M, ResNet-34 21 M,
    EfficientNet-B4 17 M) take a noticeable share of a 2-core CPU to initialise."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = models.build(name)
        return cache[name]

    return get


def _calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Give BatchNorm running statistics that match the data, so eval-mode outputs are
    O(1) rather than the near-zero logits of fresh (mean 0, var 1) statistics."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one batch sets exact statistics
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


# --- registry -----------------------------------------------------------------------


def test_registry_holds_seed_table_and_extras() -> None:
    assert set(NAMES) == set(EXPECTED_SEED) | EXPECTED_EXTRA
    assert NAMES == sorted(NAMES)
    assert models.seed_names() == sorted(EXPECTED_SEED)
    for name, row in EXPECTED_SEED.items():
        assert models.spec(name).seed_row == row
        assert models.REGISTRY[name].is_seed
    for name in EXPECTED_EXTRA:
        assert models.spec(name).seed_row is None


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as excinfo:
        models.build("nope")
    message = str(excinfo.value)
    assert "nope" in message
    for name in NAMES:
        assert name in message
    # Also a KeyError, so the registry behaves as a Mapping.
    with pytest.raises(KeyError):
        models.REGISTRY["nope"]
    assert "nope" not in models.REGISTRY
    assert models.REGISTRY.get("nope") is None


def test_duplicate_registration_raises() -> None:
    with pytest.raises(models.DuplicateModelError, match="resnet"):
        models.REGISTRY.register("resnet", "trainer.models.resnet:resnet", seed_row=None, params_target=1.0)
    assert models.spec("resnet").seed_row == "ResNet"  # the failed call changed nothing

    registry = models.Registry()
    registry.register("tiny", lambda num_classes=10: nn.Linear(4, num_classes), seed_row=None, params_target=0.0)
    with pytest.raises(ValueError, match="tiny"):
        registry.register("tiny", lambda num_classes=10: nn.Linear(4, num_classes), seed_row=None, params_target=0.0)
    assert registry.names() == ["tiny"]


def test_the_registry_is_read_without_torch() -> None:
    """Every command checks its input against the registry: that must not wait for torch (issue #21)."""
    code = ("import sys; from trainer import models; "
            "print(models.names()); print(models.seed_names()); "
            "print(models.REGISTRY['resnet'].params_target, models.spec('resnet9_tiny').recipe); "
            "print(models.parse_names('resnet,vgg_bn', '--arch'), models.seed_row('alexnet')[0]); "
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines() == [
        str(NAMES), str(sorted(EXPECTED_SEED)), "21.2 tiny.yaml", "['resnet', 'vgg_bn'] AlexNet", "[]"]


def test_each_constructor_path_names_its_function() -> None:
    for name in NAMES:
        spec = models.spec(name)
        module, function = spec.source.split(":")
        assert (spec.constructor.__module__, spec.constructor.__name__) == (module, function), name
    assert models.resnet9.resnet9_tiny is models.spec("resnet9_tiny").constructor  # the modules stay attributes
    with pytest.raises(ValueError, match="'package.module:function'"):
        models.Registry().register("linear", "trainer.models.linear", seed_row=None, params_target=0.0)


def test_num_classes_is_passed_through() -> None:
    model = models.build("resnet9", num_classes=100).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 100)


def test_airbench94_is_the_papers_network() -> None:
    """airbench94.py's layout (arXiv 2404.00498): a 2x2 unpadded stem of 24 channels with bias and a
    GELU, three conv groups of 64, 256, 256 (conv, pool, BN, GELU, conv, BN, GELU), max-pool 3, a
    bias-free linear layer, logits x 1/9; 1.97 M parameters."""
    net = models.build("airbench94", whiten=True)
    stem, act, *groups, pool = net.features
    assert isinstance(act, nn.GELU) and isinstance(pool, nn.MaxPool2d) and pool.kernel_size == 3
    assert (stem.weight.shape, stem.bias.shape) == ((24, 3, 2, 2), (24,))
    kinds = [nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, nn.GELU, nn.Conv2d, nn.BatchNorm2d, nn.GELU]
    for group, (c_in, c_out) in zip(groups, [(24, 64), (64, 256), (256, 256)], strict=True):
        assert [type(m) for m in group] == kinds
        conv1, conv2 = group[0], group[4]
        for conv, fan_in in ((conv1, c_in), (conv2, c_out)):
            assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding, conv.bias) == (
                fan_in, c_out, (3, 3), (1, 1), None)
        assert group[1].kernel_size == 2 and group[2].num_features == group[5].num_features == c_out
    assert (net.fc.in_features, net.fc.out_features, net.fc.bias) == (256, 10, None)
    assert not any(isinstance(m, nn.ReLU) for m in net.modules())
    x = torch.randn(2, 3, 32, 32)
    assert net.features[:2](x).shape == (2, 24, 31, 31)  # no padding: 31 -> 15 -> 7 -> 3 -> 1
    assert net.features(x).shape == (2, 256, 1, 1)
    with torch.no_grad():
        net.eval()
        torch.testing.assert_close(net(x), net.fc(net.features(x).flatten(1)) / 9)
    print(f"airbench94: {count_params(net):,} parameters (whitened), "
          f"{count_params(models.build('airbench94')):,} with a trained stem")
    assert count_params(net) == 1_972_504 and abs(count_params(net) / 1e6 - 1.97) < 0.01


# --- every network ------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_params_within_target(name: str, built: Callable[[str], nn.Module]) -> None:
    params = count_params(built(name))
    target = models.spec(name).params_target
    assert within_target(params, target), f"{name}: {params / 1e6:.3f} M vs target {target} M +-5%"


def _train_step_gradients(name: str, model: nn.Module, x: torch.Tensor, autocast: bool) -> None:
    """One forward+backward in train mode (dropout, stochastic depth, BN batch statistics);
    every parameter must come out with a finite gradient."""
    model.train().zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    assert out.shape == (2, 10)
    out.float().square().mean().backward()
    # A parameter without a gradient is one DDP would wait for forever (or reject).
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{name}: parameters without a gradient: {missing}"
    nonfinite = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not nonfinite, f"{name}: non-finite gradients: {nonfinite}"
    model.zero_grad(set_to_none=True)  # free the gradient memory of the big nets


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_reaches_every_parameter(name: str, built: Callable[[str], nn.Module]) -> None:
    _train_step_gradients(name, built(name), torch.randn(2, 3, 32, 32), autocast=False)


@pytest.mark.parametrize("name", NAMES)
def test_channels_last_bf16_autocast(name: str, built: Callable[[str], nn.Module]) -> None:
    """The training configuration: channels_last weights and inputs, bf16 autocast."""
    model = built(name).to(memory_format=torch.channels_last)
    try:
        x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
        _train_step_gradients(name, model, x, autocast=True)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.eval()(x)
        assert out.shape == (2, 10) and torch.isfinite(out.float()).all()
    finally:
        model.to(memory_format=torch.contiguous_format)


@pytest.mark.slow
def test_compile_bf16_matches_eager() -> None:
    torch.manual_seed(0)
    model = models.build("resnet9").to(memory_format=torch.channels_last)
    _calibrate_batchnorm(model, torch.randn(64, 3, 32, 32))
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    compiled = torch.compile(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager_out = model(x).float()
        compiled_out = compiled(x).float()
    # Inductor fuses ops and may keep fp32 where eager rounds to bf16, so the outputs agree
    # to bf16 precision (8 mantissa bits, 1.6e-2 relative as torch.testing uses for bf16)
    # relative to the logits' scale, not bit for bit.
    scale = eager_out.abs().max().item()
    assert scale > 0.05, "calibrated logits should be O(1)"
    torch.testing.assert_close(compiled_out, eager_out, rtol=1.6e-2, atol=1.6e-2 * scale)


def test_cli_prints_table(built: Callable[[str], nn.Module], capsys) -> None:
    # `python -m trainer.models`'s main, in this process (its real process: test_entry_points).
    from trainer.models.__main__ import main

    assert main([]) == 0
    stdout = capsys.readouterr().out
    assert "GFLOPs (2 per MAC)" in stdout
    rows = {line.split()[0]: line for line in stdout.splitlines()[2:] if line.strip()}
    assert set(rows) == set(NAMES)
    for name in NAMES:
        assert f"{count_params(built(name)):,}" in rows[name]


@pytest.mark.parametrize("name", NAMES)
def test_docstring_states_parameter_count(name: str, built: Callable[[str], nn.Module]) -> None:
    """Each module's docstring quotes its exact count; this catches the two drifting apart."""
    module = sys.modules[models.spec(name).constructor.__module__]
    assert f"{count_params(built(name)):,}" in (module.__doc__ or "")
