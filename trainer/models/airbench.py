"""airbench94's network (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", 2024,
arXiv 2404.00498; airbench94.py): the network of the speed profile (jobs/configs/speed.yaml), so its
time to 94% compares with airbench's own, network for network. Page's ResNet-9 (resnet9.py) stays
registered for comparison (jobs/configs/speed-resnet9.yaml).

stem: 2x2 conv, no padding, 3 -> 24 channels with bias, GELU (32x32 -> 31x31) ->
three conv groups of widths 64, 256, 256, each
    conv 3x3 (padding 1, no bias) -> max-pool 2 -> BatchNorm -> GELU -> conv 3x3 -> BatchNorm -> GELU
(31 -> 15 -> 7 -> 3) -> max-pool 3 (3x3 -> 1x1) -> linear 256 -> 10 without bias -> logits x 1/9.
No residual connections: dirac init (model.dirac_init) makes the plain stack train like one.

GELU is the network's own activation (model.activation=gelu changes nothing; relu, the config's
default, means "as defined" and leaves it too). The BatchNorm layers are torch's defaults as built;
airbench's settings (eps 1e-12, momentum 0.4 in torch's convention, scales frozen at 1) are the
model options speed.yaml sets, as for any network.

``whiten=True`` makes the stem airbench's: a frozen patch-whitening layer whose 24 filters
``trainer.models.whitening.fit`` sets from training images, with a trainable bias; 1,972,504
parameters (10 classes; the BatchNorm scales counted, trainable or frozen): the paper's 1.97 M. ``whiten=False`` trains
the same 2x2 conv from torch's default init (airbench's "no whitening" ablation): its 288 weights
become parameters, 1,972,792 in all.
"""

from __future__ import annotations

from torch import Tensor, nn

from trainer.models.whitening import PatchWhitening


class ConvGroup(nn.Sequential):
    def __init__(self, c_in: int, c_out: int) -> None:
        # Pooling before the first BatchNorm, as airbench orders it: the norm and the GELU then run on
        # a quarter of the positions.
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(c_out),
            nn.GELU(),
            nn.Conv2d(c_out, c_out, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.GELU(),
        )


class Airbench94(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (64, 256, 256),
        logit_scale: float = 1 / 9,
        whiten: bool = False,
    ) -> None:
        super().__init__()
        stem_out = PatchWhitening.out_channels  # 24: the +/- eigenvectors of 2x2x3 patches
        stem = PatchWhitening() if whiten else nn.Conv2d(3, stem_out, kernel_size=2, padding=0, bias=True)
        w1, w2, w3 = widths
        self.features = nn.Sequential(
            stem, nn.GELU(),
            ConvGroup(stem_out, w1), ConvGroup(w1, w2), ConvGroup(w2, w3),
            nn.MaxPool2d(3),
        )
        self.fc = nn.Linear(w3, num_classes, bias=False)
        # airbench's fixed 1/9 on the logits: a soft initial softmax for its high learning rate.
        self.logit_scale = logit_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).flatten(1)) * self.logit_scale


def airbench94(num_classes: int = 10, whiten: bool = False) -> nn.Module:
    return Airbench94(num_classes, whiten=whiten)
