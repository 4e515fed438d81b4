"""FUN-AD: find the defective parts in an unlabelled folder dumped from the line.

The method rests on one observation: normal parts are many and alike, so their patch
features sit close together, while defects are rare and scattered. Here:

1. Patch features of every image (frozen backbone, stride 16); each image is scored by
   its patches' nearest-neighbour distance to the patches of all *other* images.
2. Iteratively reconstructed memory bank (IRMB), each round: the images scored below the
   median are the confident normals; the bank is rebuilt from a random half of them;
   every patch gets its nearest-neighbour distance to the bank, normalised by the
   median and MAD of the confident normals' patches; patches beyond `patch_z` are
   pseudo-labelled anomalous.
3. A small scoring head learns those pseudo-labels (balanced BCE), with a
   mutual-smoothness loss that pulls the scores of mutually-nearest patches of different
   images together, so that a few noisy labels do not split a true cluster. Its maximum
   patch logit is the image's score for the next round.

Images scoring far above the rest (median + `suspect_mad` MADs) are the suspects. A pool
whose first scores spread widely, or where many images are suspects, gets a warning that
the assumption fails; defects that all look alike can still pass for normal. Nearest
neighbours are exact (torch.cdist in chunks): at a few hundred images of 196 patches,
faster than building an index.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from coft.runtime.model.errors import CoftError
from coft.train.progress import bar

log = logging.getLogger(__name__)

MIN_IMAGES = 20
MOSTLY_DEFECTS = 0.4  # more suspects than this: the majority does not look normal
WIDE_SPREAD = 2.0  # q75/q25 of the first scores; pools with a tight normal majority measured about 1.35


@dataclass
class FunadConfig:
    rounds: int = 4
    confident_fraction: float = 0.5  # images scored below this quantile are confident normals
    patch_z: float = 3.0  # robust z above which a patch is pseudo-labelled anomalous
    head_steps: int = 200
    lr: float = 1e-3
    lambda_ms: float = 1.0  # weight of the mutual-smoothness loss
    suspect_mad: float = 3.0  # suspects score above median + this many MADs

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class FunadResult:
    scores: np.ndarray  # [N] final image scores (higher: more likely defective)
    suspects: np.ndarray  # [N] bool
    cutoff: float
    history: list[dict]


def _nearest(query: torch.Tensor, bank: torch.Tensor, query_owner: torch.Tensor, bank_owner: torch.Tensor,
             chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance to, and index of, the nearest bank row that belongs to another image."""
    dists, idx = [], []
    for i in range(0, len(query), chunk):
        d = torch.cdist(query[i:i + chunk], bank)
        d.masked_fill_(query_owner[i:i + chunk, None] == bank_owner[None, :], float("inf"))
        best = d.min(dim=1)
        dists.append(best.values)
        idx.append(best.indices)
    return torch.cat(dists), torch.cat(idx)


def _robust_z(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    median = reference.median()
    mad = (reference - median).abs().median().clamp_min(1e-8) * 1.4826
    return (values - median) / mad


def mutual_pairs(flat: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """[K, 2] indices of patches that are each other's nearest neighbour, from different images."""
    _, nn_idx = _nearest(flat, flat, owner, owner)
    i = torch.arange(len(flat))
    mutual = (nn_idx[nn_idx] == i) & (i < nn_idx)
    return torch.stack([i[mutual], nn_idx[mutual]], dim=1)


def scoring_head(dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Linear(128, 1))


def _train_head(head: nn.Module, flat: torch.Tensor, labels: torch.Tensor, pairs: torch.Tensor,
                config: FunadConfig, generator: torch.Generator) -> float:
    optimiser = torch.optim.Adam(head.parameters(), lr=config.lr)
    positive, negative = labels.nonzero().flatten(), (labels == 0).nonzero().flatten()
    half = 256
    loss = torch.zeros(())
    for _ in range(config.head_steps):
        pick = [negative[torch.randint(len(negative), (half,), generator=generator)]]
        if len(positive):
            pick.append(positive[torch.randint(len(positive), (half,), generator=generator)])
        idx = torch.cat(pick)
        loss = F.binary_cross_entropy_with_logits(head(flat[idx]).squeeze(1), labels[idx])
        if len(pairs) and config.lambda_ms:
            p = pairs[torch.randint(len(pairs), (2 * half,), generator=generator)]
            s = torch.sigmoid(head(flat[p.flatten()]).view(-1, 2))
            loss = loss + config.lambda_ms * (s[:, 0] - s[:, 1]).abs().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return loss.item()


def find_suspects(features: torch.Tensor, config: FunadConfig, seed: int = 0, progress: bool = True) -> FunadResult:
    """Score every image of an unlabelled pool from its patch features [N, P, C]."""
    n, p, c = features.shape
    if n < MIN_IMAGES:
        raise CoftError(f"FUN-AD needs at least {MIN_IMAGES} images to tell normal from defective, the folder has {n}; "
                        "add images, or train on a clean folder without --unlabelled")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    flat = features.reshape(-1, c).float()
    owner = torch.arange(n).repeat_interleave(p)
    distance, _ = _nearest(flat, flat, owner, owner)
    scores = distance.view(n, p).max(dim=1).values
    spread = float(np.quantile(scores.numpy(), 0.75) / max(np.quantile(scores.numpy(), 0.25), 1e-12))
    pairs = mutual_pairs(flat, owner)
    head = scoring_head(c)
    history = []
    for round_ in bar(range(config.rounds), desc="FUN-AD rounds", unit="round", show=progress):
        confident = np.flatnonzero(scores.numpy() <= np.quantile(scores.numpy(), config.confident_fraction))
        bank_images = rng.choice(confident, max(1, len(confident) // 2), replace=False)
        in_bank = torch.zeros(n, dtype=torch.bool)
        in_bank[torch.from_numpy(bank_images)] = True
        bank_rows = in_bank[owner]
        distance, _ = _nearest(flat, flat[bank_rows], owner, owner[bank_rows])
        distance = distance.view(n, p)
        # An image in the bank has only the other half to compare with: still a fair distance.
        reference = distance[torch.from_numpy(confident)].flatten()
        labels = (_robust_z(distance, reference) > config.patch_z).float().flatten()
        head_loss = _train_head(head, flat, labels, pairs, config, generator)
        with torch.no_grad():
            scores = head(flat).view(n, p).max(dim=1).values  # logits: no saturation, so the MAD cutoff works
        history.append({"round": round_ + 1, "bank_images": len(bank_images), "anomalous_patches": int(labels.sum()),
                        "head_loss": round(head_loss, 4)})
    s = scores.numpy().astype(np.float64)
    median = np.median(s)
    cutoff = float(median + config.suspect_mad * 1.4826 * np.median(np.abs(s - median)))
    suspects = s > cutoff
    if suspects.mean() > MOSTLY_DEFECTS or spread > WIDE_SPREAD:
        log.warning("the folder does not look like mostly normal parts (%.0f%% suspects, score spread %.2f): FUN-AD "
                    "assumes normal parts are the tight majority; check the folder or pick good images by hand",
                    100 * suspects.mean(), spread)
    return FunadResult(s, suspects, cutoff, history)
