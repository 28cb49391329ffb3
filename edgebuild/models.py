"""A small built-in CNN for ``edgebuild init`` without ``--backbone``: a from-scratch baseline
for small images (``python:edgebuild.models:small_cnn`` for RGB/BGR, ``small_cnn_gray`` for
grayscale). Its last ``nn.Linear`` is the head that a build replaces with one for the classes."""

from __future__ import annotations

from torch import nn


def _block(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(*_block(in_channels, w, 1), *_block(w, w, 2), *_block(w, 2 * w, 1), *_block(2 * w, 2 * w, 2),
                                      *_block(2 * w, 4 * w, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def small_cnn() -> nn.Module:
    return SmallCNN(3)


def small_cnn_gray() -> nn.Module:
    return SmallCNN(1)
