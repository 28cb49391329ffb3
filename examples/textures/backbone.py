"""The textures example's backbone: a plain 6-layer CNN for 128x128 RGB images.

Pretrained by make_example.py on eight texture classes (task A); the edgebuild example
transfers it to six other ones (task B). 0.3 M parameters, 35 M MACs at 128x128; plain
3x3 convolutions train about 3x faster on a CPU than depthwise blocks of the same MACs. The
first layer normalises each image's channels (InstanceNorm, no weights): the random colours and
contrasts of the data otherwise stall training from scratch for many epochs.
"""

from torch import nn


def layer(cin, cout, stride=1):
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class TexNet(nn.Module):
    def __init__(self, num_classes=8):
        super().__init__()
        self.norm = nn.InstanceNorm2d(3)
        self.features = nn.Sequential(
            *layer(3, 16, 2),      # 64x64
            *layer(16, 32, 2),     # 32x32
            *layer(32, 64, 2),     # 16x16
            *layer(64, 64),
            *layer(64, 128, 2),    # 8x8
            *layer(128, 128),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(self.norm(x))).flatten(1))


def build():
    return TexNet(num_classes=8)
