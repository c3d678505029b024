import torch

from shared.network import InputTransform
from shared.preprocess import Preprocessing
from training.engine.batches import Augmentation, DeviceLoader, Sampling, random_crop, random_flip

IDENTITY = Preprocessing(image_size=8, input_size=8, mean=(0, 0, 0), std=(1, 1, 1))


def images(n=6, size=8):
    values = torch.arange(n * 3 * size * size, dtype=torch.int64).remainder(251)
    return values.to(torch.uint8).view(n, 3, size, size)


def test_crop_keeps_the_shape_and_moves_content_by_at_most_the_padding():
    x = images()
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    for i in range(len(x)):  # each output is a window of the zero-padded original
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        windows = [padded[:, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_flip_mirrors_some_images_and_leaves_the_others():
    x = images(64)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_loader_covers_every_image_once_per_epoch_when_not_dropping():
    x = images(10)
    labels = torch.arange(10)
    loader = DeviceLoader(x, labels, 4, InputTransform(IDENTITY), Sampling(shuffle=True))
    seen = torch.cat([y for _, y in loader])
    assert len(loader) == 3 and sorted(seen.tolist()) == list(range(10))


def test_loader_normalizes_and_resizes_for_224_pixel_networks():
    prep = Preprocessing(image_size=8, input_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
    batch, _ = next(iter(DeviceLoader(x, torch.zeros(2, dtype=torch.long), 2, InputTransform(prep))))
    assert batch.shape == (2, 3, 16, 16)
    assert torch.allclose(batch, torch.full_like(batch, 2.0))


def test_same_seed_gives_the_same_augmented_batches():
    x, labels = images(8), torch.arange(8)

    def first_batch():
        sampling = Sampling(shuffle=True, seed=3, augmentation=Augmentation(2, flip="random"))
        loader = DeviceLoader(x, labels, 4, InputTransform(IDENTITY), sampling)
        return next(iter(loader))

    (a, ya), (b, yb) = first_batch(), first_batch()
    assert torch.equal(a, b) and torch.equal(ya, yb)


def test_reflect_crop_pads_with_the_mirror_image_not_zeros():
    x = images(1)
    out = random_crop(x, 2, torch.Generator().manual_seed(1), fill="reflect")
    padded = torch.nn.functional.pad(x.float(), (2, 2, 2, 2), mode="reflect").to(torch.uint8)[0]
    windows = [padded[:, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
    assert any(torch.equal(out[0], w) for w in windows)


def test_alternating_flip_shows_every_image_both_ways_in_two_epochs():
    x = images(32)
    loader = DeviceLoader(x, torch.arange(32), 32, InputTransform(IDENTITY),
                          Sampling(augmentation=Augmentation(flip="alternate")))
    (first, _), (second, _) = next(iter(loader)), next(iter(loader))
    original = x.float() / 255
    for i in range(32):
        views = {torch.equal(first[i], original[i]), torch.equal(second[i], original[i])}
        assert views == {True, False}  # once as is, once mirrored
    assert 4 < sum(torch.equal(first[i], original[i]) for i in range(32)) < 28
