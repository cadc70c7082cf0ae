"""SAN's semantics-aligned decoder, SA-Dec (Jin et al., "Semantics-Aligned Representation Learning
for Person Re-identification", AAAI 2020, Fig. 2): a U-Net-like decoder from the encoder's last
map, with skips from the three stages before it, regressing the person's full-body texture image
in a pose-free UV layout.

Written after the released code (``ConvResDecoder`` and ``init_decoder_weights`` in main.py of
microsoft/Semantics-Aligned-Representation-Learning-for-Person-Re-identification; notes in
../shared/methods/san.md, 1.2). For ResNet-50 with last stride 1 at 256x128 (maps x1..x3, f of
64x32, 32x16, 16x8, 16x8):

    r  = ReLU(BN(conv1x1(f)))                 2048 -> 512
    d1 = Up(r + ReLU(BN(conv1x1(x3))))        512 -> 256, 32x16
    d2 = Up(d1 + ReLU(BN(conv1x1(x2))))       256 -> 64,  64x32
    d3 = Up(d2 + ReLU(BN(conv1x1(x1))))       64 -> 32,   128x64
    d4 = Up(d3)                               32 -> 16,   256x128
    T  = conv7x7(ReflectionPad(3)(d4))        16 -> 3, no tanh (targets are in [-1, 1])

then T is resized bilinearly (align_corners) to the texture size (256x256 published). d1..d4 are
the maps SAN's triplet ReID constraints read (loss.decoder_triplet).

Generic over backbones: the skips' channels are the backbone's ``stage_channels``, the widths
(512, 256, 64, 32, 16 published) are scaled by ``model.san.decoder_width``, and where a skip's map
is not the running map's size (last stride 2, odd input sizes) the skip is resized bilinearly to
the running map before the sum, so the decoder always climbs from the last map in steps of 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: The released widths: the reduced last map (and the deepest skip), then each Up block's output.
PUBLISHED_WIDTHS = (512, 256, 64, 32, 16)
#: The decoder's block outputs as the head names them (loss.decoder_triplet reads them).
BLOCK_KEYS = ("decoder.1", "decoder.2", "decoder.3", "decoder.4")


def _embed(cin: int, cout: int) -> nn.Sequential:
    """The released code's 1x1 reduction of the last map and of each skip: conv (with bias), BN,
    ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Up(nn.Module):
    """The released ``ConvResBlock(cin, cout, direction='up', stride=2)``: a residual block
    ``y = ReLU(x + BN(conv3x3(ReLU(BN(conv3x3(x))))))`` (bias-free convs), then bilinear x2
    up-sampling, reflection padding and a 3x3 conv (with bias) to ``cout`` channels, the
    up-sample-then-convolve that avoids transposed convolutions' checkerboard artefacts."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.res = nn.Sequential(
            nn.Conv2d(cin, cin, 3, padding=1, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.Conv2d(cin, cin, 3, padding=1, bias=False),
            nn.BatchNorm2d(cin),
        )
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.ReflectionPad2d(1),
            nn.Conv2d(cin, cout, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(x + self.res(x)))


def scaled_widths(width: float) -> tuple[int, ...]:
    """The published widths times ``width`` (``model.san.decoder_width``), at least 1 channel."""
    return tuple(max(1, round(c * width)) for c in PUBLISHED_WIDTHS)


class SemanticsAlignedDecoder(nn.Module):
    """SA-Dec (module docstring) on a backbone whose ``forward_stages`` maps have
    ``stage_channels`` (four, the last being the final map), decoding a texture of
    ``texture_size`` (H, W).

    ``forward(stages)`` returns the texture (B, 3, H, W) and the four block outputs d1..d4.
    """

    def __init__(
        self, stage_channels: tuple[int, ...], texture_size: tuple[int, int], width: float = 1.0
    ):
        super().__init__()
        if len(stage_channels) != 4:
            raise ValueError(
                f"SA-Dec takes 4 backbone stages (3 skips and the last map), got stage_channels="
                f"{tuple(stage_channels)}"
            )
        c1, c2, c3, c4 = stage_channels
        w = scaled_widths(width)
        self.texture_size = (int(texture_size[0]), int(texture_size[1]))
        self.reduce = _embed(c4, w[0])
        # skips[i] feeds block i: the deepest skip (x3) first, as the sum before up1
        self.skips = nn.ModuleList([_embed(c3, w[0]), _embed(c2, w[1]), _embed(c1, w[2])])
        self.blocks = nn.ModuleList([Up(w[i], w[i + 1]) for i in range(4)])
        self.out = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(w[4], 3, 7))
        self.apply(_reference_init)

    def forward(self, stages: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x1, x2, x3, last = stages
        x = self.reduce(last)
        blocks = []
        for i, block in enumerate(self.blocks):
            if i < len(self.skips):
                skip = self.skips[i]((x3, x2, x1)[i])
                if skip.shape[-2:] != x.shape[-2:]:
                    skip = F.interpolate(
                        skip, size=x.shape[-2:], mode="bilinear", align_corners=False
                    )
                x = x + skip
            x = block(x)
            blocks.append(x)
        texture = self.out(x)
        if tuple(texture.shape[-2:]) != self.texture_size:
            # the released code stretches 256x128 to 256x256 this way
            texture = F.interpolate(
                texture, size=self.texture_size, mode="bilinear", align_corners=True
            )
        return texture, blocks


def _reference_init(m: nn.Module) -> None:
    """``init_decoder_weights(net, 'xavier', gain=0.02)`` of the released code: conv weights
    Xavier-normal with gain 0.02 and zero biases; BatchNorm scales N(1, 0.02^2), zero shifts."""
    if isinstance(m, nn.Conv2d):
        nn.init.xavier_normal_(m.weight, gain=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
