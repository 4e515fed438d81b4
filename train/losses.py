"""The three COFT-AD losses, on L2-normalised projection-head outputs.

L_all = L_Con + lambda_PP * L_PP + lambda_NP * L_NP
- L_Con: NT-Xent between two augmented views of each image.
- L_PP: cross-instance positive pairs: views of *different* good images are pulled together,
  so the good parts form one tight cluster rather than one cluster per photo.
- L_NP: negative pairs: good views are pushed away from synthesised defects.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Contrastive loss over two views [B, d] of images `ids` [B].

    When a batch repeats an image (fewer shots than the batch), the views of that same
    image are not treated as negatives: they are masked out of the denominator.
    """
    b = z1.shape[0]
    z = torch.cat([z1, z2])
    all_ids = torch.cat([ids, ids])
    logits = z @ z.T / temperature
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    same_image = all_ids[:, None] == all_ids[None, :]
    is_partner = torch.zeros_like(same_image)
    is_partner[torch.arange(2 * b), partner] = True
    logits = logits.masked_fill(same_image & ~is_partner, float("-inf"))
    return F.cross_entropy(logits, partner)


def positive_pair_loss(z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean (1 - cosine) over all pairs of views of different images; 0 if the batch has one image."""
    different = ids[:, None] != ids[None, :]
    if not different.any():
        return z.new_zeros(())
    return (1 - z @ z.T)[different].mean()


def negative_pair_loss(z_good: torch.Tensor, z_defect: torch.Tensor) -> torch.Tensor:
    """Mean positive cosine between good views and synthetic defects: zero once they are orthogonal or opposed."""
    return F.relu(z_good @ z_defect.T).mean()
