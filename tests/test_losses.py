"""The COFT-AD losses and augmentations do what the method needs."""

import torch
from torch.nn import functional as F

from coft.train.anomalies import synthesise
from coft.train.augment import AugmentConfig, augment
from coft.train.losses import negative_pair_loss, nt_xent, positive_pair_loss


def _unit(x):
    return F.normalize(x, dim=1)


def test_nt_xent_rewards_matching_views():
    torch.manual_seed(0)
    z = _unit(torch.randn(8, 16))
    ids = torch.arange(8)
    aligned = nt_xent(z, _unit(z + 0.01 * torch.randn(8, 16)), ids, 0.2)
    shuffled = nt_xent(z, _unit(torch.randn(8, 16)), ids, 0.2)
    assert aligned < shuffled


def test_views_of_a_repeated_image_are_not_negatives():
    z1, z2 = _unit(torch.randn(4, 8)), _unit(torch.randn(4, 8))
    # One image repeated four times: only its partner view remains, so there is nothing to contrast.
    assert nt_xent(z1, z2, torch.zeros(4, dtype=torch.long), 0.2).item() == 0.0
    # Two images, each twice: the repeat must be masked, so the loss differs from treating all as distinct.
    masked = nt_xent(z1, z2, torch.tensor([0, 0, 1, 1]), 0.2)
    distinct = nt_xent(z1, z2, torch.arange(4), 0.2)
    assert masked < distinct


def test_positive_pairs_pull_different_images_together():
    same = _unit(torch.ones(4, 8))
    assert positive_pair_loss(same, torch.arange(4)).item() < 1e-6
    spread = _unit(torch.eye(4, 8))
    assert positive_pair_loss(spread, torch.arange(4)).item() == 1.0
    assert positive_pair_loss(spread, torch.zeros(4, dtype=torch.long)).item() == 0.0


def test_negative_pairs_push_defects_away():
    good = _unit(torch.tensor([[1.0, 0.0]]))
    assert negative_pair_loss(good, _unit(torch.tensor([[0.0, 1.0]]))).item() == 0.0
    assert negative_pair_loss(good, good).item() == 1.0


def test_augment_is_reproducible_and_keeps_range_and_shape():
    pixels = torch.rand(3, 3, 32, 48) * 255
    a = augment(pixels, AugmentConfig(), torch.Generator().manual_seed(1))
    b = augment(pixels, AugmentConfig(), torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == pixels.shape  # non-square: no quarter turns
    assert a.min() >= 0 and a.max() <= 255 and not torch.equal(a, pixels)


def test_synthetic_defects_change_a_part_of_the_image():
    pixels = torch.full((6, 3, 64, 64), 128.0) + torch.rand(6, 3, 64, 64) * 40
    defects = synthesise(pixels, torch.Generator().manual_seed(0))
    changed = (defects - pixels).abs().sum(1) > 1
    fraction = changed.float().mean(dim=(1, 2))
    assert torch.all(fraction > 0.001) and torch.all(fraction < 0.5)
