"""What every backbone is: stages over RGB pixels in 0..255, a global embedding, patch features; and strict loading
of weight files, so that a file that does not fit says so."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from coft.runtime.model.errors import CoftError


def patch_features_from_maps(maps: list[torch.Tensor], stride: int = 8) -> torch.Tensor:
    """[N, P, C] from a backbone's stage outputs, on a grid of `stride` 8 or 16."""
    mid = F.avg_pool2d(maps[1], 3, 1, 1)
    deep = F.avg_pool2d(maps[2], 3, 1, 1)
    grid = mid.shape[-2:] if stride == 8 else deep.shape[-2:]
    mid = F.adaptive_avg_pool2d(mid, grid) if stride == 16 else mid
    deep = F.interpolate(deep, size=grid, mode="bilinear", align_corners=False) if stride == 8 else deep
    return torch.cat([mid, deep], 1).flatten(2).transpose(1, 2)


class Backbone(nn.Module):
    """Stages (a CNN's four, at strides 4, 8, 16, 32) and the ImageNet classifier, over RGB pixels in 0..255."""

    def __init__(self, name: str, stages: list[nn.Module], channels: tuple[int, ...],
                 classifier: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.name = name
        self.stages = nn.ModuleList(stages)
        self.channels = channels
        self.classifier = classifier
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def embedding_dim(self) -> int:
        return self.channels[-1]

    @property
    def feature_blocks(self) -> int:
        """How many blocks' patch features lie side by side in a row, each searched on its own by the knn bank."""
        return 1

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std

    def feature_maps(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Output of every stage for RGB pixels in 0..255, shape [N, 3, H, W]."""
        x, maps = self.normalise(pixels), []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    @staticmethod
    def pool(maps: torch.Tensor) -> torch.Tensor:
        return maps.mean(dim=(2, 3))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Globally pooled last-stage features: the embedding that is scored."""
        return self.pool(self.feature_maps(pixels)[-1])

    patch_stride = 8
    patch_stages = 3  # stages that patch features need: up to stride 16, the last stage is skipped
    default_trainable = 1  # COFT-AD trains the last stage (the patch scorer reads stages 2-3: see docs/accuracy.md)

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, P, C] from the first `patch_stages` stages only (see `patches_from_maps`)."""
        x, maps = self.normalise(pixels), []
        for stage in self.stages[:self.patch_stages]:
            x = stage(x)
            maps.append(x)
        return self.patches_from_maps(maps)

    def patches_from_maps(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Stride-8 and stride-16 stage outputs, 3x3 averaged."""
        return patch_features_from_maps(maps, self.patch_stride)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self(pixels))


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CoftError(f"{path}: weights file not found; pass --weights with the path of a .pth state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad file
        raise CoftError(f"{path}: not a loadable weights-only state dict ({type(exc).__name__}); re-save it with torch.save(model.state_dict())") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CoftError(f"{path}: holds a {type(state).__name__}, not a state dict; re-save it with torch.save(model.state_dict())")
    return state


def _load_strict(model: nn.Module, state: dict, path: Path, name: str) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CoftError(
            f"{path}: does not fit {name} ({len(missing)} missing keys, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}); use the matching --backbone"
        )
