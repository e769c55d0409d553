"""The synthetic benchmark's generative process, the image-pair loaders and the tensor augmentations."""

import pytest
import torch

from adassl_fast.apps import data


def test_mixing_is_invertible_leaky_mlp_with_normalised_columns():
    mix = data.mixing_mlp(10, 3, seed=0, cond_samples=200)
    linears = [m for m in mix if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and all(m.bias is None for m in linears)
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in mix) == 2
    for m in linears:
        assert torch.allclose(m.weight.norm(dim=0), torch.ones(10), atol=1e-6)
        assert torch.linalg.cond(m.weight.double()) < 1e3
    assert not any(p.requires_grad for p in mix.parameters())
    # Same seed, same g; different seed, different g.
    assert torch.equal(linears[0].weight, data.mixing_mlp(10, 3, seed=0, cond_samples=200)[0].weight)
    assert not torch.equal(linears[0].weight, data.mixing_mlp(10, 3, seed=1, cond_samples=200)[0].weight)


def test_pair_conditional_keeps_each_factor_with_probability_keep():
    ds = data.SyntheticPairs(10, keep=0.8, seed=0, cond_samples=100)
    z, z_pos = ds.latent_pairs(20000, torch.Generator().manual_seed(0))
    assert z.min() >= -1 and z.max() <= 1
    kept = (z == z_pos).float().mean(0)
    assert torch.allclose(kept, torch.full((10,), 0.8), atol=0.015)
    changed = z_pos[z != z_pos]
    assert abs(float(changed.mean())) < 0.03 and float(changed.std()) == pytest.approx((1 / 3) ** 0.5, abs=0.02)


def test_batches_are_a_function_of_seed_rank_and_step():
    ds = data.SyntheticPairs(10, seed=0, cond_samples=100)
    x1, y1 = ds.batch(7, 16)
    x2, y2 = ds.batch(7, 16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(ds.batch(8, 16)[0], x1)
    other_rank = data.SyntheticPairs(10, seed=0, rank=1, cond_samples=100)
    assert not torch.equal(other_rank.batch(7, 16)[0], x1)
    other_seed = data.SyntheticPairs(10, seed=0, cond_samples=100, batch_seed=5)
    assert not torch.equal(other_seed.batch(7, 16)[0], x1)
    # The observations are g(z): the eval set returns latents scaled by 1/sd(U[-1, 1]).
    x, z = ds.eval_set(64, "test")
    assert torch.allclose(ds.observe(z * data.LATENT_SD), x, atol=1e-5)
    assert not torch.equal(ds.eval_set(64, "train")[1], z)


def test_conditioning_threshold_is_the_minimum_over_25000_draws_of_the_same_generator():
    assert data.COND_SAMPLES == 25_000  # docs/spec.md 6.1 (cl-ica's n_iter_cond_thresh)
    mix = data.mixing_mlp(10, 3, seed=7)
    # Recompute the threshold independently: the first 25,000 unit-column U(-1, 1) matrices of the seed's generator.
    g = torch.Generator().manual_seed(7)
    w = torch.rand(25_000, 10, 10, generator=g, dtype=torch.float64) * 2 - 1
    s = torch.linalg.svdvals(w / w.norm(dim=1, keepdim=True))
    threshold = float((s[:, 0] / s[:, -1]).min())
    assert mix.cond_threshold == pytest.approx(threshold, rel=1e-12)
    for m in mix:
        if isinstance(m, torch.nn.Linear):  # stored as float32: the cast moves cond by ~1e-7
            assert float(torch.linalg.cond(m.weight.double())) <= threshold * (1 + 1e-5)


def test_standardisation_is_a_fixed_affine_of_the_seeds_mixing():
    ds = data.SyntheticPairs(10, seed=0, cond_samples=200)
    # The affine is the seed's: the training stream does not change it, another seed's mixing does.
    same = data.SyntheticPairs(10, seed=0, cond_samples=200, batch_seed=9)
    assert torch.equal(ds.mean, same.mean) and torch.equal(ds.std, same.std)
    other = data.SyntheticPairs(10, seed=1, cond_samples=200)
    assert not torch.allclose(ds.mean, other.mean)
    # Every batch and split goes through that one affine, never through its own statistics.
    for step, size in ((3, 4), (8, 64)):
        z, z_pos = ds.latent_pairs(size, data.step_generator(0, step))
        x, x_pos = ds.batch(step, size)
        assert torch.equal(x, (ds.mixing(z) - ds.mean) / ds.std)
        assert torch.equal(x_pos, (ds.mixing(z_pos) - ds.mean) / ds.std)
    assert ds.batch(3, 4)[0].mean(0).abs().max() > 1e-3  # a batch standardised by itself would have mean 0
    # ... and it standardises: a large held-out sample has per-coordinate mean ~0 and std ~1.
    x, _ = ds.eval_set(1 << 15, "test")
    assert x.mean(0).abs().max() < 0.03 and (x.std(0) - 1).abs().max() < 0.03
    raw = ds.mixing(ds.eval_set(1 << 15, "test")[1] * data.LATENT_SD)
    assert raw.std(0).max() < 0.6  # the raw mixing is far from unit scale: the affine is not the identity


def test_train_draws_one_mixing_per_seed_by_default():
    from adassl_fast.apps import train

    mixing = lambda **kw: train.make_data(train.make_config(**kw), 0, 1).mixing[0].weight
    assert torch.equal(mixing(seed=7), data.mixing_mlp(10, 3, seed=7)[0].weight)
    assert not torch.equal(mixing(seed=7), mixing(seed=8))
    assert torch.equal(mixing(seed=8, data_seed=7), mixing(seed=7))  # an explicit data_seed pins g


def _write_images(folder, names, size=(20, 16)):
    Image = pytest.importorskip("PIL.Image")
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", size, color=(10 * i, 255 - 10 * i, 128)).save(folder / name)


def test_frame_pairs_within_clips(tmp_path):
    _write_images(tmp_path / "clipA", [f"{i:03d}.png" for i in range(5)])
    _write_images(tmp_path / "clipB", [f"{i:03d}.png" for i in range(2)])
    pairs = data.frame_pairs(tmp_path, gap=2)
    assert [(a.parent.name, a.name, b.name) for a, b in pairs] == [
        ("clipA", "000.png", "002.png"), ("clipA", "001.png", "003.png"), ("clipA", "002.png", "004.png")]
    assert len(data.frame_pairs(tmp_path, gap=1)) == 5
    with pytest.raises(ValueError, match="no frame pairs"):
        data.frame_pairs(tmp_path, gap=9)
    with pytest.raises(FileNotFoundError):
        data.frame_pairs(tmp_path / "missing")


def test_csv_pairs_and_image_batches(tmp_path):
    _write_images(tmp_path / "img", ["a.png", "b.png", "c.jpg"])
    (tmp_path / "pairs.csv").write_text("first,second\nimg/a.png,img/b.png\nimg/b.png,img/c.jpg\n")
    pairs = data.csv_pairs(tmp_path / "pairs.csv")
    assert [(a.name, b.name) for a, b in pairs] == [("a.png", "b.png"), ("b.png", "c.jpg")]
    for aug in ("none", "weak", "strong"):
        loader = data.ImagePairs(pairs, image_size=12, augmentation=aug, seed=3)
        x, y = loader.batch(0, 3)
        assert x.shape == y.shape == (3, 3, 12, 12)
        assert x.min() >= 0 and x.max() <= 1
        x2, _ = loader.batch(0, 3)
        assert torch.equal(x, x2)  # reproducible from (seed, step)
    (tmp_path / "bad.csv").write_text("only_one_column\nimg/a.png\n")
    with pytest.raises(ValueError, match="path_a,path_b"):
        data.csv_pairs(tmp_path / "bad.csv")


def test_image_pair_epochs_cover_every_pair_once():
    loader = data.ImagePairs([(i, i) for i in range(10)], seed=0)
    seen = loader.indices(0, 5) + loader.indices(1, 5)
    assert sorted(seen) == list(range(10))
    ranks = [data.ImagePairs([(i, i) for i in range(8)], rank=r, world_size=2).indices(0, 4) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(8))


def test_augmentations_keep_shape_and_range():
    img = torch.rand(3, 40, 30)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        out = data.augment(img, 16, g, "strong")
        assert out.shape == (3, 16, 16) and out.min() >= 0 and out.max() <= 1
    assert data.gaussian_blur(torch.ones(3, 9, 9), g).allclose(torch.ones(3, 9, 9))
    with pytest.raises(ValueError, match="strength"):
        data.augment(img, 16, g, "medium")


def test_unusable_frames_are_found_when_the_pairs_are_listed(tmp_path):
    _write_images(tmp_path / "clipA", [f"{i:03d}.png" for i in range(4)])
    (tmp_path / "clipA" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature, then junk
    (tmp_path / "clipA" / "002.png").write_bytes((tmp_path / "clipA" / "000.png").read_bytes()[:50])  # cut short
    with pytest.raises(ValueError, match=r"2 of 4 image files are unusable: clip clipA: .*001.png: not a readable "
                                         r"image.*clip clipA: .*002.png: not a readable image"):
        data.frame_pairs(tmp_path, gap=1)
    with pytest.raises(ValueError, match=r"image .*001.png cannot be read"):
        data.load_image(tmp_path / "clipA" / "001.png")  # a file that goes bad after startup: still one clear error
