"""The three dense probe heads of the paper (Section 4.3) and the classification probe.

- ``linear``: a point-wise (1x1) convolution from the encoder's dense features to the outputs.
- ``deeplabv3``: torchvision's DeepLabV3 head (ASPP with a global-pooling branch, 3x3 conv, BN,
  ReLU, 1x1 classifier; Chen et al.). Atrous rates default to (6, 12, 18), DeepLab's setting for
  features at stride 16 (ViT-B/16 patch tokens).
- ``pspnet``: pyramid pooling (pools 1, 2, 3, 6; Zhao et al.) — the trainer's ``PSP`` module —
  followed by a 1x1 classifier.
- classification: a linear layer on the pooled image embedding.

Every dense head returns outputs at the feature resolution; the probe upsamples them (bilinear)
to the label size.
"""
from __future__ import annotations

from torch import nn

from trainer.model import PSP

DENSE_HEADS = ("linear", "deeplabv3", "pspnet")


def build_dense_head(kind: str, in_channels: int, out_channels: int, channels: int = 256,
                     atrous_rates=(6, 12, 18), pool_sizes=(1, 2, 3, 6), dropout: float = 0.1) -> nn.Module:
    if kind == "linear":
        return nn.Conv2d(in_channels, out_channels, 1)
    if kind == "deeplabv3":
        from torchvision.models.segmentation.deeplabv3 import DeepLabHead

        return DeepLabHead(in_channels, out_channels, atrous_rates=tuple(atrous_rates))
    if kind == "pspnet":
        return nn.Sequential(PSP(in_channels, channels, tuple(pool_sizes), dropout), nn.Conv2d(channels, out_channels, 1))
    raise ValueError(f"unknown head {kind!r}; known: {DENSE_HEADS}")


def build_linear_classifier(in_features: int, num_classes: int) -> nn.Module:
    return nn.Linear(in_features, num_classes)
