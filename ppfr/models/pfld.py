"""A PFLD-style 98-landmark detector (METHODS.md §3.4): MobileNetV2-like backbone with multi-scale features.

Layout and parameter names follow the public PFLD "PFLDInference" module, so its checkpoints (key
``pfld_backbone``) load with :func:`ppfr.models.checkpoints.load_pfld`. Input (B, 3, 112, 112) RGB in [0, 1];
output (B, 196) = 98 (x, y) landmarks in normalised [0, 1] coordinates (x 112 for pixels).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, k: int, s: int, p: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, p, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, use_res_connect: bool, expand_ratio: int) -> None:
        super().__init__()
        hid = inp * expand_ratio
        self.use_res_connect = use_res_connect
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hid, 1, 1, 0, bias=False), nn.BatchNorm2d(hid), nn.ReLU(inplace=True),
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), nn.BatchNorm2d(hid), nn.ReLU(inplace=True),
            nn.Conv2d(hid, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class PFLDInference(nn.Module):
    NUM_LANDMARKS = 98

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(64, 64, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3_1 = InvertedResidual(64, 64, 2, False, 2)
        self.block3_2 = InvertedResidual(64, 64, 1, True, 2)
        self.block3_3 = InvertedResidual(64, 64, 1, True, 2)
        self.block3_4 = InvertedResidual(64, 64, 1, True, 2)
        self.block3_5 = InvertedResidual(64, 64, 1, True, 2)
        self.conv4_1 = InvertedResidual(64, 128, 2, False, 2)
        self.conv5_1 = InvertedResidual(128, 128, 1, False, 4)
        self.block5_2 = InvertedResidual(128, 128, 1, True, 4)
        self.block5_3 = InvertedResidual(128, 128, 1, True, 4)
        self.block5_4 = InvertedResidual(128, 128, 1, True, 4)
        self.block5_5 = InvertedResidual(128, 128, 1, True, 4)
        self.block5_6 = InvertedResidual(128, 128, 1, True, 4)
        self.conv6_1 = InvertedResidual(128, 16, 1, False, 2)  # 16 @ 14
        self.conv7 = _conv_bn(16, 32, 3, 2)  # 32 @ 7
        self.conv8 = nn.Conv2d(32, 128, 7, 1, 0)  # 128 @ 1
        self.bn8 = nn.BatchNorm2d(128)
        self.avg_pool1 = nn.AvgPool2d(14)
        self.avg_pool2 = nn.AvgPool2d(7)
        self.fc = nn.Linear(176, 2 * self.NUM_LANDMARKS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) in [0, 1] -> (B, 196) normalised landmark coordinates."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.conv3_1(x)
        for name in ("block3_2", "block3_3", "block3_4", "block3_5", "conv4_1", "conv5_1", "block5_2", "block5_3",
                     "block5_4", "block5_5", "block5_6", "conv6_1"):  # fmt: skip
            x = getattr(self, name)(x)
        x1 = self.avg_pool1(x).flatten(1)
        x = self.conv7(x)
        x2 = self.avg_pool2(x).flatten(1)
        x3 = self.relu(self.conv8(x)).flatten(1)
        return self.fc(torch.cat([x1, x2, x3], dim=1))

    def landmarks(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in [-1, 1] (B, 3, 112, 112) -> (B, 98, 2) landmarks in pixels (x = column, y = row)."""
        return self(images * 0.5 + 0.5).reshape(-1, self.NUM_LANDMARKS, 2) * images.shape[-1]
