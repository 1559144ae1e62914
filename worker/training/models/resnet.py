"""ResNets with basic blocks, sized for small images.

Layouts from He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016):
depth 6n+2 (8..56) is the CIFAR network of section 4.2 (three stages of n blocks at
widths w, 2w, 4w); depth 18/34 is the ImageNet table's four stages ([2,2,2,2] and
[3,4,6,3] blocks at w..8w), with a 3x3 stem instead of the 7x7 conv and max-pool,
as is usual for 32x32 inputs. Shortcuts are projections (1x1 conv + BN, the paper's
option B) where the shape changes; initialization follows torchvision's resnet.py.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.dataset_catalog import DatasetInfo
from shared.model_catalog import ResNetParams
from worker.training.models.activations import make_activation

# depth -> blocks per stage for the ImageNet-style layouts
_WIDE_LAYOUTS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv is followed by BatchNorm, which has its own shift.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-act-conv3x3-BN plus the shortcut, then act (ReLU in the paper)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, activation: str) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # One module used twice, as torchvision's `relu`; it has no parameters, so the
        # state-dict keys stay what they were when this was always ReLU.
        self.act = make_activation(activation, inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(
        self,
        in_channels: int,
        width: int,
        blocks_per_stage: tuple[int, ...],
        strides: tuple[int, ...],
        num_outputs: int,
        dropout: float,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            _conv3x3(in_channels, width),
            nn.BatchNorm2d(width),
            make_activation(activation, inplace=True),
        )
        stages: list[nn.Module] = []
        channels = width
        for i, (n, stride) in enumerate(zip(blocks_per_stage, strides, strict=True)):
            out = width * 2**i
            blocks = [BasicBlock(channels, out, stride, activation)]
            blocks += [BasicBlock(out, out, 1, activation) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(channels, num_outputs),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # ReLU's gain for every activation: BatchNorm follows each conv, so the
                # scale a gain would fix is normalized away at once.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Each residual branch starts as zero, so every block starts as the identity
        # (Goyal et al. 2017, "Accurate, Large Minibatch SGD", section 5.1).
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def build_resnet(params: ResNetParams, info: DatasetInfo) -> nn.Module:
    if params.depth in _WIDE_LAYOUTS:
        layout = _WIDE_LAYOUTS[params.depth]
        strides = (1, 2, 2, 2)
    else:
        n = (params.depth - 2) // 6  # two layers per block, plus the stem conv and the classifier
        layout, strides = (n, n, n), (1, 2, 2)
    return ResNet(
        info.input_shape[0], params.width, layout, strides, info.output_dim, params.dropout,
        params.activation,
    )  # fmt: skip
