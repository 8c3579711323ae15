"""A frozen patch-whitening first layer (airbench: Jordan 2024, arXiv 2404.00498, sec. 3.2).

The layer is a 2x2 convolution without padding whose 24 filters are the 12 eigenvectors of
the covariance of the training images' 2x2x3 patches, each scaled by 1/sqrt(eigenvalue + eps),
and their negatives. Its outputs over patches are then uncorrelated with unit variance, so
the first trained layer starts from decorrelated inputs instead of having to learn that; the
+/- pair means the ReLU (or GELU) that follows loses no information (relu(x) - relu(-x) = x).

The filters are a buffer, not a parameter: the optimiser, weight decay, lookahead and
every-parameter-has-a-gradient checks never see them, and they still travel in state_dict
(a resumed or exported network keeps the fit). The bias is a trainable parameter (airbench
trains it for the first few epochs only; here it simply trains), at the base learning rate as in
airbench: it is no BatchNorm bias, so optim.bias_lr_mult does not reach it.

    net = models.build("resnet9", whiten=True)
    whitening.fit(net, images)  # (N, 3, 32, 32) images, normalised as the loader gives them
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PATCH = 2  # airbench's kernel: 2x2 patches, 12 dimensions
CHANNELS = 3
DIM = CHANNELS * PATCH * PATCH
EPS = 5e-4  # airbench's: keeps near-zero-variance directions from being blown up


class PatchWhitening(nn.Module):
    """2x2 conv, padding 0, 3 -> 24 channels: 32x32 inputs give 31x31 outputs."""

    out_channels = 2 * DIM

    def __init__(self) -> None:
        super().__init__()
        # Until fit() runs, the filters whiten data whose patch covariance is already the
        # identity (+/- the unit vectors), so an unfitted network still computes something sane.
        basis = torch.eye(DIM).reshape(DIM, CHANNELS, PATCH, PATCH) / (1 + EPS) ** 0.5
        self.register_buffer("weight", torch.cat([basis, -basis]))
        self.bias = nn.Parameter(torch.zeros(self.out_channels))

    def forward(self, x: Tensor) -> Tensor:
        # Under autocast the fp32 buffer is cast like any conv weight.
        return F.conv2d(x, self.weight, self.bias)

    @torch.no_grad()
    def fit(self, images: Tensor, chunk: int = 1024) -> None:
        """Set the filters from (N, 3, H, W) images; the bias is left as it is."""
        if images.ndim != 4 or images.shape[1] != CHANNELS:
            raise ValueError(f"whitening: images must be (N, 3, H, W), got {tuple(images.shape)}")
        # Accumulate the patch covariance in float64 a chunk of images at a time: 5,000 images
        # hold 4.8 M patches, whose float32 copy alone would be 230 MB.
        total = torch.zeros(DIM, dtype=torch.float64)
        outer = torch.zeros(DIM, DIM, dtype=torch.float64)
        count = 0
        for start in range(0, len(images), chunk):
            patches = _patches(images[start:start + chunk].to(torch.float64))
            total += patches.sum(0).cpu()
            outer += (patches.T @ patches).cpu()
            count += len(patches)
        mean = total / count
        # The covariance proper (centred). airbench uses the uncentred second moment; on images
        # normalised to zero mean per channel the two agree, and centring makes the whitened
        # outputs' covariance exactly the identity whatever the data's mean.
        covariance = outer / count - torch.outer(mean, mean)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending; columns are vectors
        # Largest variance first, as airbench orders them (the order changes nothing downstream).
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
        filters = eigenvectors.T / torch.sqrt(eigenvalues.clamp(min=0) + EPS)[:, None]
        filters = filters.reshape(DIM, CHANNELS, PATCH, PATCH)
        self.weight.copy_(torch.cat([filters, -filters]).to(self.weight))


def _patches(images: Tensor) -> Tensor:
    """Every 2x2 patch of every image, as (N * (H-1) * (W-1), 12) rows laid out as the conv
    weight's (channel, row, column) flattening, so a row dotted with a flattened filter is
    that filter's output at that patch."""
    patches = F.unfold(images, kernel_size=PATCH)  # (N, 12, L), 12 in (c, i, j) order
    return patches.transpose(1, 2).reshape(-1, DIM)


def fit(net: nn.Module, images: Tensor) -> None:
    """Fit every PatchWhitening layer of ``net`` (a DDP or compiled wrapper is fine) to ``images``:
    (N, 3, 32, 32), normalised as the training loader gives them. A net without one is an error:
    the caller asked for whitening that would not happen."""
    layers = [m for m in net.modules() if isinstance(m, PatchWhitening)]
    if not layers:
        raise ValueError("whitening.fit: the network has no PatchWhitening layer (built without whiten=True?)")
    for layer in layers:
        layer.fit(images)
