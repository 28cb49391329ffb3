"""Training-batch augmentation in torch, per batch: random-resized-crop (with horizontal flip)
as one batched affine resample, then colour jitter (brightness, contrast, saturation).

Seeded by its own generator, so a build is deterministic; applied to training batches only
(fit's ``augment``), never to val, test, calibration or self-test inputs.
"""

from __future__ import annotations

import math

from .lazy import torch, F

from .config import AugmentConfig


class Augment:
    def __init__(self, cfg: AugmentConfig, mean, std, channels: int, seed: int):
        self.cfg = cfg
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1).expand(1, channels, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1).expand(1, channels, 1, 1)
        self.gen = torch.Generator().manual_seed(seed + 7919)  # its own stream: the batch order is unchanged

    def _uniform(self, n: int, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=self.gen)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: a normalised float batch (N, C, H, W) on the CPU; returns a new batch."""
        c = self.cfg
        n = x.shape[0]
        lo, hi = c.crop_scale
        area = self._uniform(n, lo, hi)
        log_ratio = self._uniform(n, math.log(3 / 4), math.log(4 / 3))
        ratio = torch.exp(log_ratio)
        sx = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width / image width
        sy = torch.sqrt(area / ratio).clamp(max=1.0)
        tx = (self._uniform(n, -1, 1)) * (1 - sx)  # crop centre, inside the image
        ty = (self._uniform(n, -1, 1)) * (1 - sy)
        if lo >= 1.0:  # crop_scale [1, 1]: no crop (nor aspect change)
            sx, sy, tx, ty = torch.ones(n), torch.ones(n), torch.zeros(n), torch.zeros(n)
        flip = torch.where(torch.rand(n, generator=self.gen) < 0.5, -1.0, 1.0) if c.hflip else torch.ones(n)
        if lo < 1.0 or c.hflip:
            theta = torch.zeros(n, 2, 3)
            theta[:, 0, 0] = sx * flip
            theta[:, 0, 2] = tx
            theta[:, 1, 1] = sy
            theta[:, 1, 2] = ty
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if c.color_jitter > 0:
            j = c.color_jitter
            raw = x * self.std + self.mean  # back to [0, 1]
            b = self._uniform(n, 1 - j, 1 + j).reshape(n, 1, 1, 1)
            k = self._uniform(n, 1 - j, 1 + j).reshape(n, 1, 1, 1)
            s = self._uniform(n, 1 - j, 1 + j).reshape(n, 1, 1, 1)
            raw = raw * b
            raw = (raw - raw.mean(dim=(1, 2, 3), keepdim=True)) * k + raw.mean(dim=(1, 2, 3), keepdim=True)
            if raw.shape[1] == 3:
                gray = raw.mean(dim=1, keepdim=True)
                raw = (raw - gray) * s + gray
            x = (raw.clamp(0, 1) - self.mean) / self.std
        return x.contiguous()
