"""Augmentations for industrial parts: poses and lighting that a line really shows.

Flips and quarter turns (a tile or a cell looks the same from either side), mild
brightness and contrast drift, a small shift with mirrored borders, and what a camera's
video path does to a frame: a JPEG round trip (MJPG streams are JPEG frames; quality
and 4:2:0 chroma subsampling vary) and a small gamma change. No random crops and no
zoom: a crop could cut the very defect away, and a zoom changes the scale a defect is
judged at. All operations act on RGB pixels in 0..255, shape [N, 3, H, W].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch
from torch.nn import functional as F


@dataclass
class AugmentConfig:
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True  # quarter turns; only applied to square inputs, else half turns
    brightness: float = 0.1  # relative, +-
    contrast: float = 0.1  # relative, +-
    shift: float = 0.03  # fraction of the side, +-
    codec: float = 1.0  # share of views sent through a JPEG round trip at quality 50..95 (camera video paths)
    gamma: float = 0.1  # +- on the exponent of a gamma change (camera and encoder transfer curves)
    # knn's bank can also hold each shot under other light: these gains (darker, brighter) and camera noise of this
    # sigma (0..255). Off by default: it won little on tiles and ELPV and lost a little on BSData (docs/accuracy.md)
    bank_gains: tuple[float, ...] = ()
    bank_noise: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def _uniform(n: int, spread: float, generator: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=generator) * 2 - 1).mul(spread).to(device)


def augment(pixels: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """One random view of each image; `generator` (on the CPU) makes it reproducible."""
    n, _, h, w = pixels.shape
    out = pixels.clone()
    flips = torch.rand(n, 3, generator=generator)
    turns = torch.randint(0, 4, (n,), generator=generator)
    for i in range(n):
        if config.hflip and flips[i, 0] < 0.5:
            out[i] = out[i].flip(-1)
        if config.vflip and flips[i, 1] < 0.5:
            out[i] = out[i].flip(-2)
        if config.rot90:
            k = int(turns[i]) if h == w else 2 * int(turns[i] % 2)
            out[i] = torch.rot90(out[i], k, dims=(-2, -1))
    if config.shift > 0:
        pad_h, pad_w = max(1, int(h * config.shift)), max(1, int(w * config.shift))
        padded = F.pad(out, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
        dy = torch.randint(0, 2 * pad_h + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad_w + 1, (n,), generator=generator)
        out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    gain = 1 + _uniform(n, config.contrast, generator, out.device).view(n, 1, 1, 1)
    offset = _uniform(n, config.brightness, generator, out.device).view(n, 1, 1, 1) * 255
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - mean) * gain + mean + offset).clamp(0, 255)
    exponent = (1 + _uniform(n, config.gamma, generator, out.device)).view(n, 1, 1, 1)
    out = 255 * (out / 255) ** exponent
    coded = (torch.rand(n, generator=generator) < config.codec).tolist()
    qualities = torch.randint(50, 96, (n,), generator=generator).tolist()
    for i in (i for i in range(n) if coded[i]):
        out[i] = jpeg_round_trip(out[i], qualities[i])
    return out


def jpeg_round_trip(pixels: torch.Tensor, quality: int) -> torch.Tensor:
    """One RGB image [3, H, W] in 0..255 encoded and decoded as a camera's MJPG stream would (4:2:0 chroma)."""
    bgr = pixels.detach().round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()[..., ::-1]
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(bgr), [cv2.IMWRITE_JPEG_QUALITY, quality])
    decoded = cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1].copy()
    return torch.from_numpy(decoded).permute(2, 0, 1).to(pixels)


def light_count(config: AugmentConfig) -> int:
    """How many lights `lit` gives each shot (1: as it is only)."""
    return 1 + len(config.bank_gains) + (config.bank_noise > 0)


LIGHT_VIEWS = {"bank_gains": (0.8, 1.2), "bank_noise": 8.0}  # coft train --light-views: RoBiS's brightness range


def lit(pixels: torch.Tensor, config: AugmentConfig) -> list[torch.Tensor]:
    """The shots as they are, then under each of the bank's lights: each gain, then camera noise (a fixed seed:
    the same shots give the same bank)."""
    views = [pixels] + [(pixels * gain).clamp(0, 255) for gain in config.bank_gains]
    if config.bank_noise > 0:
        noise = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(0)) * config.bank_noise
        views.append((pixels + noise.to(pixels.device)).clamp(0, 255))
    return views
