"""NLL-AngMF surface-normal network (Bae, Budvytis, Cipolla, ICCV 2021), our implementation.

Architecture as published (paper + DESIGN.md §3); module and parameter names follow the official
checkpoint layout so ``scannet.pt`` (BN) and ``nyu.pt`` (GN) load with ``strict=True``:

- ``encoder.original_model``: gen-efficientnet ``tf_efficientnet_b5_ap`` without its pooling and
  classifier. Skip features are the outputs of blocks 0, 1, 2, 4 and of ``conv_head`` (before
  ``bn2``; its parameters are in the checkpoint but do not reach the decoder) — 24/40/64/176/2048
  channels at 1/2, 1/4, 1/8, 1/16, 1/32.
- ``decoder.conv2``: 1x1 conv on the 1/32 feature. ``decoder.up1..up4``: bilinear upsampling
  (align_corners=True) to the skip's size, concatenation, then ``_net`` = [3x3 conv, norm,
  LeakyReLU] x 2 (indices 0,1 / 3,4 hold parameters); BN variant: BatchNorm; GN variant:
  GroupNorm(8) after weight-standardised convs. Widths 1024/512/256/128.
- ``decoder.out_conv_res8``: 3x3 conv to 4 channels (x, y, z, kappa) at 1/8.
- ``decoder.out_conv_res{4,2,1}``: pixel-wise MLPs (Conv1d 1x1, 128-128-128-4, ReLU between;
  indices 0, 2, 4, 6) applied at 1/4, 1/2, 1/1 to the upsampled decoder feature concatenated with
  the upsampled coarser prediction. At test time every pixel is refined (the uncertainty-guided
  sampling is a training device).
- Every prediction is post-processed the same way: xyz divided by its norm (+1e-10), kappa =
  ELU(k) + 1 + 0.01, so kappa > 0.01.

Returned normals are in the network's native frame; ``normal.py`` converts them to ours.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

B5_CHANNELS = (24, 40, 64, 176, 2048)
DEFAULT_WIDTHS = (1024, 512, 256, 128)
ENCODER_TAPS = (0, 1, 2, 4)  # block indices whose outputs are skip features; the 5th is conv_head
MIN_KAPPA = 0.01


def norm_normalize(out: torch.Tensor) -> torch.Tensor:
    """(B, 4, ...) raw head output -> unit xyz and kappa = ELU(k) + 1 + MIN_KAPPA."""
    xyz, k = out[:, :3], out[:, 3:]
    xyz = xyz / (torch.linalg.vector_norm(xyz, dim=1, keepdim=True) + 1e-10)
    return torch.cat([xyz, F.elu(k) + 1.0 + MIN_KAPPA], dim=1)


class WSConv2d(nn.Conv2d):
    """Conv with weight standardisation (Qiao et al.): per output filter, zero mean and unit
    (unbiased) std, with 1e-5 added to the std — the GN variant's convs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = w - w.mean(dim=(1, 2, 3), keepdim=True)
        w = w / (w.flatten(1).std(dim=1).view(-1, 1, 1, 1) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class UpBlock(nn.Module):
    """Upsample to the skip feature, concatenate, two conv-norm-LeakyReLU layers."""

    def __init__(self, in_ch: int, out_ch: int, variant: str) -> None:
        super().__init__()
        if variant == "BN":
            conv, norm = nn.Conv2d, nn.BatchNorm2d
        elif variant == "GN":
            conv, norm = WSConv2d, (lambda c: nn.GroupNorm(8, c))
        else:
            raise ValueError(f"variant must be 'BN' or 'GN', got {variant!r}")
        self._net = nn.Sequential(conv(in_ch, out_ch, 3, padding=1), norm(out_ch), nn.LeakyReLU(),
                                  conv(out_ch, out_ch, 3, padding=1), norm(out_ch), nn.LeakyReLU())

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self._net(torch.cat([x, skip], dim=1))


def _pixel_mlp(in_ch: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(in_ch, hidden, 1), nn.ReLU(), nn.Conv1d(hidden, hidden, 1), nn.ReLU(),
                         nn.Conv1d(hidden, hidden, 1), nn.ReLU(), nn.Conv1d(hidden, 4, 1))


class Decoder(nn.Module):
    def __init__(self, enc_channels=B5_CHANNELS, variant: str = "BN", widths=DEFAULT_WIDTHS,
                 mlp_hidden: int = 128) -> None:
        super().__init__()
        c0, c1, c2, c4, head = enc_channels
        w1, w2, w3, w4 = widths
        self.conv2 = nn.Conv2d(head, head, 1)
        self.up1 = UpBlock(head + c4, w1, variant)
        self.up2 = UpBlock(w1 + c2, w2, variant)
        self.up3 = UpBlock(w2 + c1, w3, variant)
        self.up4 = UpBlock(w3 + c0, w4, variant)
        self.out_conv_res8 = nn.Conv2d(w2, 4, 3, padding=1)
        self.out_conv_res4 = _pixel_mlp(w2 + 4, mlp_hidden)
        self.out_conv_res2 = _pixel_mlp(w3 + 4, mlp_hidden)
        self.out_conv_res1 = _pixel_mlp(w4 + 4, mlp_hidden)

    @staticmethod
    def _refine(mlp: nn.Sequential, feat: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """Pixel-wise MLP on (2x feature, 2x coarser prediction) at every pixel."""
        x = torch.cat([F.interpolate(feat, scale_factor=2, mode="bilinear", align_corners=True),
                       F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=True)], dim=1)
        b, c, h, w = x.shape
        return norm_normalize(mlp(x.reshape(b, c, h * w))).reshape(b, 4, h, w)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        f0, f1, f2, f4, head = feats
        d1 = self.up1(self.conv2(head), f4)
        d2 = self.up2(d1, f2)
        d3 = self.up3(d2, f1)
        d4 = self.up4(d3, f0)
        out8 = norm_normalize(self.out_conv_res8(d2))
        out4 = self._refine(self.out_conv_res4, d2, out8)
        out2 = self._refine(self.out_conv_res2, d3, out4)
        out1 = self._refine(self.out_conv_res1, d4, out2)
        return [out8, out4, out2, out1]


class Encoder(nn.Module):
    def __init__(self, arch: str = "tf_efficientnet_b5_ap") -> None:
        super().__init__()
        import geffnet

        model = geffnet.create_model(arch, pretrained=False)  # weights come from the checkpoint
        model.global_pool = nn.Identity()
        model.classifier = nn.Identity()
        self.original_model = model

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        m = self.original_model
        x = m.act1(m.bn1(m.conv_stem(x)))
        feats = []
        for i, block in enumerate(m.blocks):
            x = block(x)
            if i in ENCODER_TAPS:
                feats.append(x)
        feats.append(m.conv_head(x))  # bn2/act2 would follow; the decoder never sees them
        return feats

    @torch.no_grad()
    def channels(self) -> tuple[int, ...]:
        was_training = self.training
        self.eval()
        feats = self.forward(torch.zeros(1, 3, 64, 64))
        self.train(was_training)
        return tuple(int(f.shape[1]) for f in feats)


class NNET(nn.Module):
    """Encoder + decoder; ``forward`` returns [1/8, 1/4, 1/2, 1/1] predictions, (B, 4, h, w)
    each: native-frame unit normals and kappa."""

    def __init__(self, variant: str = "BN", arch: str = "tf_efficientnet_b5_ap", widths=DEFAULT_WIDTHS,
                 mlp_hidden: int = 128) -> None:
        super().__init__()
        self.variant = variant
        self.encoder = Encoder(arch)
        self.decoder = Decoder(self.encoder.channels(), variant, widths, mlp_hidden)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.decoder(self.encoder(x))


def official_state_dict(checkpoint: dict) -> dict:
    """``{'model': state_dict, 'iter': n}`` as saved by the official training script (possibly
    from DataParallel, hence the ``module.`` prefix) -> a state_dict for :class:`NNET`."""
    sd = checkpoint["model"] if isinstance(checkpoint, dict) and "model" in checkpoint else checkpoint
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
