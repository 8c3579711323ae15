"""The model.* options (trainer/models/options.py, whitening.py): each one's defining property,
checked on the real networks of the registry (the small ones: the code paths are shared)."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer import UserError, models
from trainer.config import ModelConfig
from trainer.models import options, whitening
from trainer.models.flops import count_params
from trainer.models.whitening import PatchWhitening


def _correlated_images(n: int = 64) -> torch.Tensor:
    """Images whose 2x2 patches are strongly correlated: blurred noise (neighbouring pixels
    share most of their inputs), mixed across channels, off a non-zero mean. A little pixel
    noise keeps the smallest patch variance (about 0.05) well above the whitening's eps of 5e-4,
    so the whitened variances are 1 to within 1%."""
    g = torch.Generator().manual_seed(0)
    blurred = 3 * F.avg_pool2d(torch.randn(n, 3, 34, 34, generator=g), kernel_size=3, stride=1)
    blurred += 0.3 * torch.randn(blurred.shape, generator=g)
    mix = torch.tensor([[1.0, 0.8, 0.6], [0.2, 1.0, 0.5], [0.1, 0.3, 1.0]])
    return torch.einsum("oc,nchw->nohw", mix, blurred) + 0.5


def _patch_covariance(maps: torch.Tensor) -> torch.Tensor:
    rows = maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1]).double()
    return torch.cov(rows.T)


def _one_train_step(net: nn.Module) -> None:
    net.train().zero_grad(set_to_none=True)
    out = net(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    out.square().mean().backward()


# --- whitening ----------------------------------------------------------------------


def test_whitening_fit_makes_patch_covariance_identity() -> None:
    images = _correlated_images()
    net = models.build("resnet9_tiny", whiten=True)
    whitening.fit(net, images)
    layer = net.features[0]
    assert isinstance(layer, PatchWhitening)

    raw = F.unfold(images, kernel_size=2)  # the 12-dim patches themselves
    raw_cov = torch.cov(raw.transpose(1, 2).reshape(-1, 12).T.double())
    raw_corr = raw_cov / raw_cov.diagonal().sqrt().outer(raw_cov.diagonal().sqrt())
    assert (raw_corr - torch.eye(12, dtype=torch.float64)).abs().max() > 0.5  # far from white to start with

    # One sign of the eigenvectors: the first 12 filters, without the (trainable) bias.
    whitened = F.conv2d(images, layer.weight[:12])
    assert whitened.shape == (64, 12, 31, 31)
    torch.testing.assert_close(_patch_covariance(whitened), torch.eye(12, dtype=torch.float64), atol=2e-2, rtol=0)
    torch.testing.assert_close(layer.weight[12:], -layer.weight[:12])  # the +/- pairs


def test_whitening_is_a_frozen_buffer_with_a_trainable_bias() -> None:
    torch.manual_seed(0)
    net = models.build("resnet9_tiny", whiten=True)
    whitening.fit(net, _correlated_images(16))
    names = dict(net.named_parameters())
    assert "features.0.weight" not in names and names["features.0.bias"].requires_grad
    assert "features.0.weight" in net.state_dict()  # a resumed or exported net keeps the fit

    _one_train_step(net)
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"

    x = torch.randn(2, 3, 32, 32)
    assert net.features[:2](x).shape == (2, 24, 31, 31)
    assert net.features(x).shape == (2, 128, 3, 3)  # the max-pools floor: 31 -> 15 -> 7 -> 3
    copy = models.build("resnet9_tiny", whiten=True)
    copy.load_state_dict(net.state_dict())
    torch.testing.assert_close(copy.eval()(x), net.eval()(x))


@pytest.mark.parametrize("names", [("resnet9", "resnet9_tiny"), ("airbench94",)])
def test_whiten_parameter_counts_are_the_documented_ones(names: tuple[str, ...]) -> None:
    doc = sys.modules[models.spec(names[0]).constructor.__module__].__doc__ or ""
    for name in names:
        params = count_params(models.build(name, whiten=True))
        assert f"{params:,}" in doc
        assert params != count_params(models.build(name))


def test_fit_refuses_a_net_without_whitening() -> None:
    with pytest.raises(ValueError, match="no PatchWhitening"):
        whitening.fit(models.build("resnet9_tiny"), _correlated_images(4))


# --- output stride ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["mobilenet", "mobilenet_big", pytest.param("efficientnet_b0", marks=pytest.mark.slow)]
)
def test_output_stride_8_gives_4x4_maps_and_the_same_parameters(name: str) -> None:
    def final_maps(net: nn.Module) -> tuple[int, ...]:
        with torch.no_grad():
            return tuple(net.features(torch.randn(1, 3, 32, 32)).shape[2:])

    default, stride8 = models.build(name).eval(), models.build(name, output_stride=8).eval()
    assert final_maps(default) == (2, 2)
    assert final_maps(stride8) == (4, 4)
    assert count_params(stride8) == count_params(default)
    assert stride8(torch.randn(1, 3, 32, 32)).shape == (1, 10)


# --- generic options ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet9_tiny", "alexnet"])
def test_gelu_replaces_every_relu(name: str) -> None:
    relus = sum(isinstance(m, nn.ReLU) for m in models.build(name).modules())
    assert relus > 0
    net = options.build(ModelConfig(arch=name, activation="gelu"))
    assert not any(isinstance(m, nn.ReLU) for m in net.modules())
    assert sum(isinstance(m, nn.GELU) for m in net.modules()) == relus
    _one_train_step(net)


def test_gelu_refused_without_relu() -> None:
    with pytest.raises(UserError, match="model.activation: architecture 'efficientnet_b0' has no ReLU"):
        options.build(ModelConfig(arch="efficientnet_b0", activation="gelu"))


def test_batchnorm_options_reach_every_batchnorm() -> None:
    cfg = ModelConfig(arch="resnet9_tiny", bn_momentum=0.4, bn_eps=1e-12, bn_frozen_scale=True)
    net = options.build(cfg)
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 8
    for norm in norms:
        assert norm.momentum == 0.4 and norm.eps == 1e-12
        assert not norm.weight.requires_grad and torch.equal(norm.weight, torch.ones_like(norm.weight))

    # The momentum is the one used: from fresh statistics (mean 0), one batch moves the running
    # mean 0.4 of the way to the batch's mean.
    seen: list[torch.Tensor] = []
    norms[0].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach()))
    _one_train_step(net)
    torch.testing.assert_close(norms[0].running_mean, 0.4 * seen[0].mean(dim=(0, 2, 3)))
    for norm in norms:
        assert norm.weight.grad is None and norm.bias.grad is not None  # only the shift learns


def test_batchnorm_options_refused_without_batchnorm() -> None:
    with pytest.raises(UserError, match="model.bn_frozen_scale: architecture 'alexnet' has no BatchNorm"):
        options.build(ModelConfig(arch="alexnet", bn_frozen_scale=True))


@pytest.mark.parametrize("whiten", [False, True])
def test_dirac_init_makes_convs_identities_on_their_first_channels(whiten: bool) -> None:
    net = models.build("resnet9_tiny", whiten=whiten)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for conv in convs:
            conv.weight.zero_()  # so the identity is all that is left
    options.apply(net, ModelConfig(arch="resnet9_tiny", dirac_init=True))

    # Without whitening the first conv (the prep layer, on the image) is skipped; after a
    # whitening layer, every 3x3 conv is a target (as in airbench).
    targets = convs if whiten else convs[1:]
    if not whiten:
        assert not convs[0].weight.any()
    x = torch.randn(2, 128, 8, 8)
    for conv in targets:
        k = min(conv.in_channels, conv.out_channels)
        y = conv(x[:, : conv.in_channels])
        torch.testing.assert_close(y[:, :k], x[:, :k])
        assert not y[:, k:].any()


def test_dirac_init_keeps_the_default_init_beyond_the_identity() -> None:
    torch.manual_seed(0)
    plain = models.build("resnet9_tiny")
    torch.manual_seed(0)
    net = options.build(ModelConfig(arch="resnet9_tiny", dirac_init=True))
    conv, before = net.features[1][0], plain.features[1][0]  # layer1's conv: 16 -> 32 channels
    assert torch.equal(conv.weight[16:], before.weight[16:])
    assert not torch.equal(conv.weight[:16], before.weight[:16])


def test_dirac_init_refused_without_3x3_convs() -> None:
    with pytest.raises(UserError, match="model.dirac_init: architecture 'mobilenet'"):
        options.build(ModelConfig(arch="mobilenet", dirac_init=True))


# --- airbench94 with the speed profile's options -------------------------------------


def test_airbench94_takes_every_option_of_the_speed_profile() -> None:
    cfg = ModelConfig(arch="airbench94", whiten=True, activation="gelu", bn_momentum=0.4, bn_eps=1e-12,
                      bn_frozen_scale=True, dirac_init=True)
    torch.manual_seed(0)
    net = options.build(cfg)
    images = _correlated_images(32)
    whitening.fit(net, images)

    # whiten: the stem is the fitted whitening layer (its outputs' patch covariance the identity).
    stem = net.features[0]
    assert isinstance(stem, PatchWhitening) and "features.0.weight" not in dict(net.named_parameters())
    whitened = F.conv2d(images, stem.weight[:12])
    torch.testing.assert_close(_patch_covariance(whitened), torch.eye(12, dtype=torch.float64), atol=2e-2, rtol=0)
    # gelu: its own activation, left as it is (7 GELUs: the stem's and two per group).
    assert sum(isinstance(m, nn.GELU) for m in net.modules()) == 7
    assert not any(isinstance(m, nn.ReLU) for m in net.modules())
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6
    for norm in norms:
        assert norm.momentum == 0.4 and norm.eps == 1e-12 and not norm.weight.requires_grad
    # dirac: all six 3x3 convs (the whitening stem is no conv to skip) start as identities on their
    # first in_channels filters.
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6
    for conv in convs:
        k = conv.in_channels
        assert torch.equal(conv.weight[:k], nn.init.dirac_(torch.empty_like(conv.weight[:k])))
    _one_train_step(net)
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"


def test_airbench94_without_whitening_trains_its_stem() -> None:
    net = options.build(ModelConfig(arch="airbench94", dirac_init=True))
    stem = net.features[0]
    assert isinstance(stem, nn.Conv2d) and stem.weight.requires_grad and stem.kernel_size == (2, 2)
    assert not torch.equal(stem.weight[:3], nn.init.dirac_(torch.empty_like(stem.weight[:3])))  # first layer: skipped
    with pytest.raises(ValueError, match="no PatchWhitening"):
        whitening.fit(net, _correlated_images(4))


# --- options and the registry -------------------------------------------------------


@pytest.mark.parametrize(("name", "option"), [("alexnet", {"whiten": True}), ("resnet9", {"output_stride": 8}),
                                              ("airbench94", {"output_stride": 8})])
def test_an_unsupported_option_is_refused_by_name(name: str, option: dict[str, object]) -> None:
    with pytest.raises(UserError) as excinfo:
        models.build(name, **option)
    message = str(excinfo.value)
    assert f"model.{next(iter(option))}" in message and f"'{name}'" in message and "\n" not in message


def test_from_config_passes_only_what_differs_from_the_default() -> None:
    assert options.from_config(ModelConfig(arch="mobilenet")) == {}
    assert options.from_config(ModelConfig(arch="mobilenet", output_stride=8)) == {"output_stride": 8}
    assert options.from_config(ModelConfig(arch="resnet9", whiten=True)) == {"whiten": True}
    # A default config builds every architecture: no option reaches a constructor that lacks it.
    assert count_params(options.build(ModelConfig(arch="alexnet"))) == count_params(models.build("alexnet"))


def test_build_saved_rebuilds_the_trained_network() -> None:
    """Export and the report rebuild a checkpoint's network: with its options, not just its name."""
    saved = dataclasses.asdict(ModelConfig(arch="mobilenet", output_stride=8, activation="gelu"))
    net = options.build_saved({"arch": "mobilenet", "config": {"model": saved}})
    with torch.no_grad():
        assert net.eval().features(torch.randn(1, 3, 32, 32)).shape[2:] == (4, 4)
    assert any(isinstance(m, nn.GELU) for m in net.modules())
    plain = options.build_saved({"arch": "mobilenet"})  # a checkpoint without a config
    assert any(isinstance(m, nn.ReLU) for m in plain.modules())


# --- AlexNet ------------------------------------------------------------------------


def test_alexnet_has_kaiming_fan_in_init_and_zero_biases() -> None:
    torch.manual_seed(0)
    layers = [m for m in models.build("alexnet").modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 8
    for layer in layers:
        fan_in = layer.weight[0].numel()
        # torch's default would be sqrt(1 / (3 fan_in)), 2.4x smaller: a 10% band tells them apart.
        assert layer.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.1)
        assert not layer.bias.any()
