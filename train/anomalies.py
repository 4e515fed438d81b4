"""Synthesised defects for the negative-pair loss: CutPaste patches, scars and blobs.

Only used when the user says such defects are plausible (`--negatives`): they teach the
features that a foreign patch, a scratch or a stain is not normal, without any real
defect image. Each works on RGB pixels in 0..255, shape [N, 3, H, W].
"""

from __future__ import annotations

import math

import torch

KINDS = ("cutpaste", "scar", "blob")


def _rand(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(1, generator=generator))


def _grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")


def _patch_mask(h: int, w: int, generator: torch.Generator) -> torch.Tensor:
    """A rectangle of 2-12% of the area with aspect ratio 0.3-3.3 (CutPaste)."""
    area = _rand(generator, 0.02, 0.12) * h * w
    aspect = math.exp(_rand(generator, math.log(0.3), math.log(3.3)))
    ph, pw = min(h - 1, int(math.sqrt(area * aspect))), min(w - 1, int(math.sqrt(area / aspect)))
    y, x = int(_rand(generator, 0, h - ph)), int(_rand(generator, 0, w - pw))
    mask = torch.zeros(h, w)
    mask[y:y + ph, x:x + pw] = 1
    return mask


def _scar_mask(h: int, w: int, generator: torch.Generator) -> torch.Tensor:
    """A thin straight scratch, 1-3% of the side wide and 15-45% long, at any angle."""
    yy, xx = _grid(h, w)
    side = min(h, w)
    cy, cx = _rand(generator, 0.2, 0.8) * h, _rand(generator, 0.2, 0.8) * w
    angle = _rand(generator, 0, math.pi)
    half_len, half_width = _rand(generator, 0.075, 0.225) * side, max(0.6, _rand(generator, 0.005, 0.015) * side)
    along = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
    across = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
    return ((along.abs() <= half_len) & (across.abs() <= half_width)).float()


def _blob_mask(h: int, w: int, generator: torch.Generator) -> torch.Tensor:
    """One to three ellipses, each 3-10% of the side across (stains, holes, chips)."""
    yy, xx = _grid(h, w)
    mask = torch.zeros(h, w)
    for _ in range(int(_rand(generator, 1, 4))):
        cy, cx = _rand(generator, 0.1, 0.9) * h, _rand(generator, 0.1, 0.9) * w
        ry, rx = _rand(generator, 0.015, 0.05) * h, _rand(generator, 0.015, 0.05) * w
        mask = torch.maximum(mask, (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).float())
    return mask


def synthesise(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One synthetic defect per image, the kind chosen at random."""
    n, _, h, w = pixels.shape
    out = pixels.clone()
    for i in range(n):
        kind = KINDS[int(torch.randint(0, len(KINDS), (1,), generator=generator))]
        if kind == "blob":
            mask = _blob_mask(h, w, generator)
            source = torch.full_like(pixels[i], 255.0 if _rand(generator, 0, 1) < 0.5 else 0.0)
        else:
            mask = _patch_mask(h, w, generator) if kind == "cutpaste" else _scar_mask(h, w, generator)
            shift = (int(_rand(generator, 0.2, 0.8) * h), int(_rand(generator, 0.2, 0.8) * w))
            gain = _rand(generator, 0.7, 1.3)
            source = (torch.roll(pixels[i], shift, dims=(-2, -1)) * gain).clamp(0, 255)
        mask = mask.to(pixels.device)
        out[i] = pixels[i] * (1 - mask) + source * mask
    return out
