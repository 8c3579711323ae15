"""The model.* options of a config, applied to a network.

Two kinds, because they differ in who can honour them:
- Constructor options change the layout and exist only where an architecture defines them:
  ``output_stride`` (mobilenet, mobilenet_big, efficientnet, efficientnet_b0) and ``whiten``
  (resnet9, resnet9_tiny, airbench94). ``from_config`` turns a config into these keyword arguments, and
  ``models.build`` refuses one the architecture lacks, by name.
- Generic options rewrite any built network's modules (``apply``): activation, bn_momentum,
  bn_eps, bn_frozen_scale, dirac_init. Each refuses a network it cannot change at all (GELU
  for a net with neither ReLUs nor GELUs, BatchNorm settings for a net without BatchNorm), rather
  than silently training the network the config did not ask for. GELU on a net that is GELU
  throughout already (airbench94) is what the config asks for, and changes nothing.

These are the speed-training techniques of airbench (Jordan 2024, arXiv 2404.00498).

    net = options.build(cfg.model)      # models.build with from_config's options, then apply
    whitening.fit(net, images)          # with model.whiten, before training
    net = options.build_saved(state)    # the network of a checkpoint, for load_state_dict
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from trainer import UserError, models
from trainer.config import ModelConfig
from trainer.models.whitening import PatchWhitening


def from_config(model_cfg: ModelConfig) -> dict[str, Any]:
    """The constructor keyword arguments the config sets away from the architecture's default
    (null/false mean "as defined", and are not passed, so every architecture accepts them)."""
    kwargs: dict[str, Any] = {}
    if model_cfg.output_stride is not None:
        kwargs["output_stride"] = model_cfg.output_stride
    if model_cfg.whiten:
        kwargs["whiten"] = True
    return kwargs


def build(model_cfg: ModelConfig, num_classes: int = 10) -> nn.Module:
    """The network a config's model section describes: the constructor options, then ``apply``."""
    net = models.build(model_cfg.arch, num_classes, **from_config(model_cfg))
    apply(net, model_cfg)
    return net


def build_saved(state: Mapping[str, Any]) -> nn.Module:
    """The network a checkpoint was trained as, from its saved config's model section, ready for
    ``load_state_dict``. Built from the architecture's name alone, a GELU or output-stride-8 network
    would load its weights without complaint and then compute something else. A checkpoint
    without a config (or from before these options) gets the architecture as defined."""
    saved = (state.get("config") or {}).get("model")
    return build(ModelConfig(**saved) if saved else ModelConfig(arch=state["arch"]))


def apply(net: nn.Module, model_cfg: ModelConfig) -> None:
    """Apply the generic options to a freshly built ``net`` in place (before it is wrapped or
    compiled, and before an optimiser sees its parameters)."""
    arch = model_cfg.arch
    if model_cfg.activation == "gelu":
        _relu_to_gelu(net, arch)
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    bn_options = {"bn_momentum": model_cfg.bn_momentum is not None, "bn_eps": model_cfg.bn_eps is not None,
                  "bn_frozen_scale": model_cfg.bn_frozen_scale}
    for name, used in bn_options.items():
        if used and not norms:
            raise UserError(f"model.{name}: architecture '{arch}' has no BatchNorm layer")
    for norm in norms:
        if model_cfg.bn_momentum is not None:
            norm.momentum = model_cfg.bn_momentum
        if model_cfg.bn_eps is not None:
            norm.eps = model_cfg.bn_eps
        if model_cfg.bn_frozen_scale and norm.weight is not None:
            # airbench: with the scale fixed at 1 a BatchNorm only shifts; the following conv's
            # weights carry the scale, and there is one less parameter per channel to tune.
            norm.weight.data.fill_(1.0)
            norm.weight.requires_grad_(False)
    if model_cfg.dirac_init:
        _dirac_init(net, arch)


def _relu_to_gelu(net: nn.Module, arch: str) -> None:
    # airbench uses GELU throughout: its smooth negative side keeps some gradient where a ReLU
    # has none, which helped its short schedules. Modules are swapped where they are attached
    # (a module used twice, as torchvision's ResNet blocks reuse self.relu, is one attribute).
    swaps = [(parent, name) for parent in net.modules()
             for name, child in parent.named_children() if isinstance(child, nn.ReLU)]
    if not swaps:
        if any(isinstance(m, nn.GELU) for m in net.modules()):
            return  # GELU is the architecture's own activation (airbench94)
        raise UserError(f"model.activation: architecture '{arch}' has no ReLU to replace by GELU")
    for parent, name in swaps:
        setattr(parent, name, nn.GELU())


def _dirac_init(net: nn.Module, arch: str) -> None:
    # airbench (its Conv.reset_parameters): the first min(out, in) filters of each 3x3 conv are
    # set to the identity (w[:in] via nn.init.dirac_), the rest keep their default init, so at
    # the start each conv passes its input through on those channels, and a deep plain net
    # trains like a residual one from the first step. The network's first layer is skipped:
    # an identity of its 3 image channels is not a useful feature; when the first layer is a
    # PatchWhitening, every 3x3 conv after it gets the identity, as in airbench.
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, PatchWhitening))]
    targets = [m for m in layers[1:]
               if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.groups == 1]
    if not targets:
        raise UserError(f"model.dirac_init: architecture '{arch}' has no full 3x3 convolution after its first layer")
    for conv in targets:
        identity = min(conv.out_channels, conv.in_channels)
        nn.init.dirac_(conv.weight.data[:identity])
