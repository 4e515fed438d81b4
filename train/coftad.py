"""COFT-AD: contrastive fine-tuning of a pretrained backbone on a few good images.

The safe recipe, from what we measured: BatchNorm statistics stay frozen (training them
on a handful of images collapses the features), only the last stage(s) of the backbone
and a small projection head train, and an optional L2-SP term keeps the trained weights
near the pretrained ones. The losses act on the projection head; the backbone's pooled
features, not the head, are what the Gaussian later scores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from coft.train.anomalies import synthesise
from coft.train.augment import AugmentConfig, augment
from coft.train.backbones import Backbone
from coft.train.losses import negative_pair_loss, nt_xent, positive_pair_loss
from coft.train.progress import bar

LEARNING_RATES = {"dinov2_vits14": 1e-5}  # what the benchmark measured a ViT at (docs/accuracy.md); others 1e-4


def default_lr(backbone: str) -> float:
    return LEARNING_RATES.get(backbone, 1e-4)


@dataclass
class FinetuneConfig:
    steps: int = 150
    batch: int = 8
    lr: float = 1e-4
    temperature: float = 0.2
    lambda_pp: float = 1.0
    lambda_np: float = 1.0
    negatives: bool = False  # synthesise defects for L_NP; only where such defects are plausible
    trainable_stages: int | None = None  # how many of the backbone's last stages train; None: its default_trainable
    l2sp: float = 0.0  # weight of the pull toward the pretrained weights
    view_pool: int = 32  # views per image sent once through the frozen stages; 0 = fresh views every step

    def as_dict(self) -> dict:
        return asdict(self)


def projection_head(dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 512), nn.ReLU(), nn.Linear(512, 128))


def _batch_ids(k: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """`batch` image indices: every image once before any repeats (few shots, larger batch)."""
    rounds = -(-batch // k)
    return torch.cat([torch.randperm(k, generator=generator) for _ in range(rounds)])[:batch]


def finetune(backbone: Backbone, pixels: torch.Tensor, config: FinetuneConfig, augment_config: AugmentConfig,
             generator: torch.Generator, progress: bool = True) -> list[dict[str, float]]:
    """Fine-tune `backbone` in place on good images `pixels` [k, 3, H, W]; returns the loss history.

    The frozen stages never change, so with `view_pool` each augmented view (and each
    synthetic defect) goes through them once, and every step samples from that pool:
    the same losses, several times faster on a CPU.
    """
    device = pixels.device
    n_train = max(1, min(config.trainable_stages or backbone.default_trainable, len(backbone.stages)))
    frozen, trained = backbone.stages[:-n_train], backbone.stages[-n_train:]
    backbone.eval()  # BatchNorm statistics stay as pretrained
    for p in backbone.parameters():
        p.requires_grad_(False)
    params = list(trained.parameters())
    for p in params:
        p.requires_grad_(True)
    anchors = [p.detach().clone() for p in params]
    head = projection_head(backbone.embedding_dim).to(device)
    optimiser = torch.optim.AdamW(params + list(head.parameters()), lr=config.lr, weight_decay=0.0)
    use_amp = device.type == "cuda"
    k = pixels.shape[0]

    @torch.no_grad()
    def through_frozen(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            x = backbone.normalise(x)
            for stage in frozen:
                x = stage(x)
        return x.float()

    def project(features: torch.Tensor) -> torch.Tensor:
        for stage in trained:
            features = stage(features)
        return F.normalize(head(backbone.pool(features)).float(), dim=1)

    def make_defects(x: torch.Tensor) -> torch.Tensor:
        return synthesise(augment(x, augment_config, generator), generator)

    if config.view_pool:
        desc = "views through frozen stages"
        views = torch.stack([through_frozen(augment(pixels, augment_config, generator))
                             for _ in bar(range(config.view_pool), desc=desc, unit="view", show=progress)])
        defects = (torch.stack([through_frozen(make_defects(pixels)) for _ in range(config.view_pool)])
                   if config.negatives else None)

        def draw(pool: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            return pool[torch.randint(0, config.view_pool, (len(ids),), generator=generator), ids]
    else:
        views = defects = None

    history = []
    for _ in bar(range(config.steps), desc="fine-tuning (COFT-AD)", unit="step", show=progress):
        ids = _batch_ids(k, config.batch, generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            if views is not None:
                f1, f2 = draw(views, ids), draw(views, ids)
                f_defect = draw(defects, ids) if config.negatives else None
            else:
                x = pixels[ids]
                f1 = through_frozen(augment(x, augment_config, generator))
                f2 = through_frozen(augment(x, augment_config, generator))
                f_defect = through_frozen(make_defects(x)) if config.negatives else None
            z1, z2 = project(f1), project(f2)
            ids = ids.to(device)
            l_con = nt_xent(z1, z2, ids, config.temperature)
            l_pp = positive_pair_loss(torch.cat([z1, z2]), torch.cat([ids, ids]))
            loss = l_con + config.lambda_pp * l_pp
            l_np = torch.zeros((), device=device)
            if f_defect is not None:
                l_np = negative_pair_loss(torch.cat([z1, z2]), project(f_defect))
                loss = loss + config.lambda_np * l_np
            if config.l2sp:
                loss = loss + config.l2sp * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        history.append({"loss": loss.item(), "con": l_con.item(), "pp": l_pp.item(), "np": l_np.item()})
    for p in backbone.parameters():
        p.requires_grad_(False)
    return history
