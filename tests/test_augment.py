"""The resident loader's on-device augmentations (data.flip_mode, translate_mode, mixup, cutmix,
mix_prob): each op's defining property, on real pixel tables of random images, and their exact
replay per (seed, epoch, step). normalised_images against the source pickles."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixel_tables import random_table, shifts_of, unaugmented
from trainer.config import DataConfig
from trainer.data import build_loaders
from trainer.data.cifar10 import MEAN, STD, read_split
from trainer.data.common import train_val_indices
from trainer.data.augment import draw_mix_plan, pixel_indices
from trainer.data.resident import ResidentLoader, epoch_order, normalised_images
from trainer.distributed import Dist

N, BATCH = 64, 16


def _table(n: int = N, pad: int = 0, seed: int = 0):
    return random_table(n, pad, seed)


_source = unaugmented  # the table's images, (N, 32, 32, 3)


LABELS = torch.randint(0, 10, (N,), generator=torch.Generator().manual_seed(1))


def _loader(seed: int = 0, batch: int = BATCH, train: bool = True, **kw) -> ResidentLoader:
    """A training loader over the shared random table; augmentations off unless given."""
    cfg = DataConfig(**{"dir": "unused", "loader": "resident", "batch_size": batch, "flip": False, "translate": 0,
                        "cutout": 0, **kw})
    return ResidentLoader(_table(), LABELS, cfg, train=train, seed=seed)


def _epoch(loader: ResidentLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return [(x.permute(0, 2, 3, 1).clone(), y.clone()) for x, y in loader]  # back to NHWC, as the table


def _check_targets(y: torch.Tensor, labels: torch.Tensor, lam: float, shift: int) -> None:
    """Mixed targets: probabilities summing to 1, lam on the image's label, 1 - lam on its partner's."""
    assert y.dtype == torch.float32 and y.shape == (len(labels), 10)
    torch.testing.assert_close(y.sum(1), torch.ones(len(labels)))
    partner = labels.roll(shift, 0)
    differ = labels != partner
    assert differ.any()
    rows = torch.arange(len(labels))
    torch.testing.assert_close(y[rows[differ], labels[differ]], torch.full((int(differ.sum()),), lam))
    torch.testing.assert_close(y[rows[differ], partner[differ]], torch.full((int(differ.sum()),), 1 - lam))
    assert ((y > 0).sum(1)[differ] == 2).all()


def test_mixup_blends_each_image_with_its_partner_by_lam():
    mixed, plain = _epoch(_loader(mixup=1.0), 0), _epoch(_loader(), 0)
    loader, lams = _loader(mixup=1.0), []
    for step, ((xm, ym), (xp, yp)) in enumerate(zip(mixed, plain, strict=True)):
        plan = loader.mix_plan(0, step)
        assert plan is not None and plan.box is None and 0 < plan.shift < BATCH  # never its own partner
        assert torch.equal(xm, xp * plan.lam + xp.roll(plan.shift, 0) * (1 - plan.lam))
        _check_targets(ym, yp, plan.lam, plan.shift)
        lams.append(plan.lam)
    assert len(set(lams)) == len(lams) and all(0 < lam < 1 for lam in lams)  # one draw per batch


def test_cutmix_takes_one_minus_lam_of_the_pixels_from_the_partner():
    mixed, plain = _epoch(_loader(cutmix=1.0), 0), _epoch(_loader(), 0)
    loader = _loader(cutmix=1.0)
    for step, ((xm, ym), (xp, yp)) in enumerate(zip(mixed, plain, strict=True)):
        plan = loader.mix_plan(0, step)
        top, bottom, left, right = plan.box
        partner = xp.roll(plan.shift, 0)
        from_partner = (xm == partner).all(-1) & (xm != xp).any(-1)  # (B, 32, 32): pixels that came from it
        assert ((xm == xp).all(-1) | from_partner).all()  # every pixel is its own or its partner's
        box = torch.zeros(32, 32, dtype=torch.bool)
        box[top:bottom, left:right] = True
        assert (from_partner == box).all()  # one box, the same place in every image
        assert from_partner.float().mean(dim=(1, 2)).sub(1 - plan.lam).abs().max() < 1e-6
        _check_targets(ym, yp, plan.lam, plan.shift)


def test_mix_plans_follow_mix_prob_alpha_and_the_coin_between_ops():
    rng = np.random.default_rng(0)
    plans = [draw_mix_plan(rng, BATCH, mixup=1.0, cutmix=1.0, mix_prob=0.3) for _ in range(4000)]
    used = [p for p in plans if p is not None]
    assert abs(len(used) / len(plans) - 0.3) < 0.03
    cut = [p for p in used if p.box is not None]
    assert abs(len(cut) / len(used) - 0.5) < 0.05
    mixup_lams = np.array([p.lam for p in used if p.box is None])
    assert abs(mixup_lams.mean() - 0.5) < 0.03 and abs(mixup_lams.std() - 12**-0.5) < 0.03  # Beta(1, 1): uniform
    for p in cut:  # lam is the area the box leaves
        top, bottom, left, right = p.box
        assert p.lam == 1 - (bottom - top) * (right - left) / 1024
    assert all(draw_mix_plan(rng, BATCH, 1.0, 0.0, 0.0) is None for _ in range(100))
    assert all(draw_mix_plan(rng, BATCH, 0.0, 0.0, 1.0) is None for _ in range(100))


def test_unmixed_batches_are_hard_one_hot_and_test_loaders_never_mix():
    never, plain = _epoch(_loader(mixup=1.0, cutmix=1.0, mix_prob=0.0), 0), _epoch(_loader(), 0)
    for (xm, ym), (xp, yp) in zip(never, plain, strict=True):
        assert torch.equal(xm, xp)
        assert ym.dtype == torch.float32 and torch.equal(ym, F.one_hot(yp, 10).float())
    test = _loader(train=False, mixup=1.0, cutmix=1.0, flip=True, flip_mode="alternate", translate=2,
                   translate_mode="reflect")
    x, y = next(iter(test))
    assert y.dtype == torch.int64 and torch.equal(y, LABELS[:BATCH])
    assert torch.equal(x.permute(0, 2, 3, 1), _source(test.table)[:BATCH])


def _mirrored(loader: ResidentLoader, epoch: int, seed: int) -> torch.Tensor:
    """(N,) bools: which images `epoch` showed mirrored (each must be exactly itself or its mirror)."""
    source, flags = _source(loader.table), torch.zeros(N, dtype=torch.bool)
    order = epoch_order(N, loader.batch_size, seed, epoch)
    x = torch.cat([b[0] for b in _epoch(loader, epoch)])
    for image, shown in zip(order.tolist(), x, strict=True):
        mirror = torch.equal(shown, source[image].flip(1))
        assert mirror or torch.equal(shown, source[image])
        flags[image] = mirror
    return flags


def test_alternate_flip_mirrors_every_image_in_every_other_epoch():
    loader = _loader(seed=5, flip=True, flip_mode="alternate")
    flags = [_mirrored(loader, e, seed=5) for e in range(4)]
    assert 0.25 < flags[0].float().mean() < 0.75  # a random half first
    for e in range(3):
        assert (flags[e + 1] != flags[e]).all()
    # The bit belongs to the image, not to its batch: other batches (another size) give the same.
    assert torch.equal(_mirrored(_loader(seed=5, batch=8, flip=True, flip_mode="alternate"), 0, seed=5), flags[0])
    assert not torch.equal(_mirrored(_loader(seed=6, flip=True, flip_mode="alternate"), 0, seed=6), flags[0])


def test_reflect_translate_is_torch_reflect_padding_then_a_crop():
    t, table = 3, _table(32)
    x = table.gather(pixel_indices(table, torch.arange(32), torch.Generator().manual_seed(3), translate=t,
                                   reflect=True))
    padded = F.pad(_source(table).permute(0, 3, 1, 2), (t, t, t, t), mode="reflect").permute(0, 2, 3, 1)
    shifts = shifts_of(x, padded, t)
    assert len(set(shifts)) > 10 and any(dy and dx for dy, dx in shifts)
    with pytest.raises(ValueError, match="at most 31"):
        pixel_indices(table, torch.arange(2), translate=32, reflect=True)


def test_every_augmentation_replays_per_seed_epoch_and_step():
    everything = {"flip": True, "flip_mode": "alternate", "translate": 2, "translate_mode": "reflect", "cutout": 4,
                  "mixup": 0.5, "cutmix": 1.0, "mix_prob": 0.5}
    loader = _loader(seed=3, **everything)
    first = _epoch(loader, 1)
    assert all(y.dtype == torch.float32 for _, y in first)  # one label type, mixed batch or not
    assert len({loader.mix_plan(1, s) is None for s in range(len(loader))}) == 2  # both kinds occur
    again = _epoch(loader, 1)
    resumed = _loader(seed=3, **everything)  # a fresh process resuming at step 2, skipping as the trainer does
    resumed.set_epoch(1)
    tail = [(x.permute(0, 2, 3, 1), y) for step, (x, y) in enumerate(resumed) if step >= 2]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for a, b in zip(first[2:], tail, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    plans = [loader.mix_plan(1, s) for s in range(len(loader))]
    assert len({(p.lam, p.shift) for p in plans if p}) == sum(p is not None for p in plans)  # fresh draws per step
    other_epoch, other_seed = _epoch(loader, 2), _epoch(_loader(seed=4, **everything), 1)
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(first, other_epoch))
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(first, other_seed))


def _file_cfg(beton_dir, **kw) -> DataConfig:
    return DataConfig(**{"dir": str(beton_dir), "loader": "resident", "num_workers": 2, "batch_size": 100,
                         "val_split": 100, "train_subset": 300, "test_subset": 100, "dtype": "bfloat16", **kw})


def test_normalised_images_are_the_training_images_the_loaders_see(beton_dir, cifar_source):
    cfg = _file_cfg(beton_dir)
    x = normalised_images(cfg, 5000, "cpu")  # more than the 300 the loader trains on: those 300
    assert x.shape == (300, 3, 32, 32) and x.dtype == torch.float32
    source = read_split(cifar_source, "train")
    train, val = train_val_indices(source.labels, cfg)
    assert len(train) == 300 and len(val) == 100 and not np.isin(train, val).any()
    mean, std = torch.tensor([255 * m for m in MEAN]), torch.tensor([255 * s for s in STD])
    expected = ((torch.from_numpy(source.images[train]).float() - mean) / std).to(torch.bfloat16).float()
    assert torch.equal(x, expected.permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="at least one image"):
        normalised_images(cfg, 0, "cpu")


@pytest.mark.slow
def test_reflect_loader_keeps_an_unpadded_table_of_the_same_images(beton_dir):
    cfg = _file_cfg(beton_dir, translate=4, translate_mode="reflect", flip_mode="alternate", cutmix=1.0)
    train, test = build_loaders(cfg, Dist.single(), threads=2)
    assert train.table.pad == 0  # reflect reads inside the image only
    assert torch.equal(_source(train.table).float().permute(0, 3, 1, 2), normalised_images(cfg, 300, "cpu"))
    batches = list(train)
    assert len(batches) == 3 and all(x.shape == (100, 3, 32, 32) and y.shape == (100, 10) for x, y in batches)
    assert next(iter(test))[1].dtype == torch.int64
