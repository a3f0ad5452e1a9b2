"""Tests of popnet_tf/data/augment.py: image/mask alignment, flip, scale, crop and
padding, seeds, and the evaluation resize. Expected values are computed with
NumPy from the source arrays, never by calling the augmentation another way."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from popnet_tf.data import augment


def _block_labels(height, width, block=8, seed=0) -> np.ndarray:
    """Labels constant on block x block cells (random ids 0-11)."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 12, size=(-(-height // block), -(-width // block)))
    return np.kron(cells, np.ones((block, block), np.int64))[:height, :width].astype(np.uint8)


def _encode_labels(labels: np.ndarray) -> np.ndarray:
    """An RGB image whose grey level is label * 20."""
    return np.repeat((labels.astype(np.int32) * 20).astype(np.uint8)[..., None], 3, axis=-1)


def _uniform_3x3(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood holds one label, not 255 (borders excluded)."""
    m = mask.astype(np.int32)
    centre = m[1:-1, 1:-1]
    same = np.ones_like(centre, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            same &= m[1 + dy:m.shape[0] - 1 + dy, 1 + dx:m.shape[1] - 1 + dx] == centre
    out = np.zeros_like(m, bool)
    out[1:-1, 1:-1] = same & (centre != 255)
    return out


def _augment(image, mask, seed, **kwargs):
    out_image, out_mask = augment.random_augment(image, mask, tf.constant([seed, 99]), **kwargs)
    return out_image.numpy(), out_mask.numpy()


@pytest.mark.parametrize("crop_size", [32, 48, (48, 32), (24, 40)])
def test_image_and_mask_stay_aligned(crop_size):
    labels = _block_labels(60, 40)
    image = _encode_labels(labels)
    rows, cols = augment.crop_shape(crop_size)
    checked = 0
    for seed in range(40):
        out_image, out_mask = _augment(image, labels, seed, crop_size=crop_size, scale_range=(0.5, 2.0))
        assert out_image.shape == (rows, cols, 3) and out_image.dtype == np.float32
        assert out_mask.shape == (rows, cols) and out_mask.dtype == np.uint8
        inner = _uniform_3x3(out_mask)
        # Away from label edges the bilinear image equals the label's grey exactly.
        np.testing.assert_allclose(out_image[..., 0][inner], out_mask[inner] * 20.0, atol=1e-3)
        # Padding (the source has no 255) is 0 in the image and 255 in the mask.
        assert np.all(out_image[out_mask == 255] == 0)
        checked += inner.sum()
    assert checked > 40 * rows * cols // 4


def test_jpeg_window_decode_matches_decoded_image():
    labels = _block_labels(60, 40, seed=3)
    image = _encode_labels(labels)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=98)
    jpeg = tf.constant(buf.getvalue())
    decoded = tf.io.decode_jpeg(jpeg, channels=3)
    for seed in range(10):
        g = augment.sample_geometry(tf.constant([seed, 1]), 60, 40, crop_size=32)
        from_jpeg = augment.augment_image(jpeg, g).numpy()
        from_pixels = augment.augment_image(decoded, g).numpy()
        # decode_and_crop_jpeg differs from a full decode only by chroma rounding.
        assert np.mean(np.abs(from_jpeg - from_pixels)) < 1.0
        assert np.all(from_jpeg[augment.augment_mask(labels, g).numpy() == 255] == 0)


@pytest.mark.parametrize("crop_size", [40, (26, 33)])
def test_scale_one_pastes_the_source_flipped_or_not(crop_size):
    # At scale 1 and a crop larger than the image, the crop is the source
    # (or its mirror) pasted at a random offset, padding elsewhere.
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 12, size=(20, 30)).astype(np.uint8)
    image = rng.integers(0, 256, size=(20, 30, 3)).astype(np.uint8)
    flips, offsets = 0, set()
    for seed in range(30):
        out_image, out_mask = _augment(image, labels, seed, crop_size=crop_size, scale_range=(1.0, 1.0))
        assert out_mask.shape == augment.crop_shape(crop_size)
        rows = np.flatnonzero((out_mask != 255).any(axis=1))
        cols = np.flatnonzero((out_mask != 255).any(axis=0))
        assert len(rows) == 20 and len(cols) == 30
        y, x = rows[0], cols[0]
        offsets.add((y, x))
        window_mask = out_mask[y:y + 20, x:x + 30]
        window_image = out_image[y:y + 20, x:x + 30]
        flipped = not np.array_equal(window_mask, labels)
        if flipped:
            flips += 1
            np.testing.assert_array_equal(window_mask, labels[:, ::-1])
            np.testing.assert_allclose(window_image, image[:, ::-1], atol=1e-3)
        else:
            np.testing.assert_allclose(window_image, image, atol=1e-3)
        assert np.all(out_image[out_mask == 255] == 0)
    assert 5 <= flips <= 25, flips
    assert len(offsets) > 10


def test_scale_two_is_nearest_neighbour_blocks():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 12, size=(10, 12)).astype(np.uint8)
    image = _encode_labels(labels)
    for seed in range(6):
        _, out_mask = _augment(image, labels, seed, crop_size=32, scale_range=(2.0, 2.0))
        rows = np.flatnonzero((out_mask != 255).any(axis=1))
        cols = np.flatnonzero((out_mask != 255).any(axis=0))
        window = out_mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        expected = np.kron(labels, np.ones((2, 2), np.uint8))
        assert window.shape == (20, 24)
        assert np.array_equal(window, expected) or np.array_equal(window, expected[:, ::-1])


def test_random_scale_changes_the_size():
    labels = np.ones((20, 16), np.uint8)
    sizes = []
    for seed in range(40):
        _, out_mask = _augment(_encode_labels(labels), labels, seed, crop_size=48, scale_range=(0.5, 2.0))
        sizes.append(int((out_mask != 255).any(axis=1).sum()))
    assert min(sizes) >= 10 and max(sizes) <= 40
    assert min(sizes) <= 14 and max(sizes) >= 34, sizes


@pytest.mark.parametrize("crop_size", [16, (16, 24)])
def test_crop_of_a_large_image_has_no_padding_and_moves(crop_size):
    labels = _block_labels(64, 64, seed=5)
    rows, cols = augment.crop_shape(crop_size)
    seen = set()
    for seed in range(10):
        _, out_mask = _augment(_encode_labels(labels), labels, seed, crop_size=crop_size,
                               scale_range=(1.0, 1.0))
        assert out_mask.shape == (rows, cols) and not np.any(out_mask == 255)
        # the crop is a window of the (possibly mirrored) source: find it
        hits = [(y, x, f) for f, src in ((0, labels), (1, labels[:, ::-1]))
                for y in range(65 - rows) for x in range(65 - cols)
                if np.array_equal(src[y:y + rows, x:x + cols], out_mask)]
        assert hits
        seen.add(hits[0])
    assert len(seen) >= 8


@pytest.mark.parametrize("crop_size, expected", [(8, (8, 8)), ((6, 4), (6, 4)), ([3, 5], (3, 5))])
def test_crop_shape(crop_size, expected):
    assert augment.crop_shape(crop_size) == expected


@pytest.mark.parametrize("crop_size", [0, (4, 0), (1, 2, 3), -2])
def test_crop_shape_refuses_bad_sizes(crop_size):
    with pytest.raises(ValueError, match="crop_size"):
        augment.crop_shape(crop_size)


def test_resize_long_side_and_table():
    labels = np.full((40, 30), 3, np.uint8)
    labels[:, :15] = 5
    table = np.arange(256, dtype=np.uint8)
    table[5] = 0
    image = _encode_labels(labels)
    g = augment.sample_geometry(tf.constant([0, 0]), 40, 30, crop_size=32, scale_range=(1.0, 1.0),
                                resize_long_side=20)
    out = augment.augment_mask(labels, g, table).numpy()
    assert (out != 255).any(axis=1).sum() == 20 and (out != 255).any(axis=0).sum() == 15
    assert set(np.unique(out).tolist()) == {0, 3, 255}
    assert augment.augment_image(image, g).numpy().max() > 0


def test_seeds_make_it_reproducible():
    labels = _block_labels(30, 30)
    image = _encode_labels(labels)
    a = _augment(image, labels, 7, crop_size=24)
    b = _augment(image, labels, 7, crop_size=24)
    c = _augment(image, labels, 8, crop_size=24)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1]) or not np.array_equal(a[0], c[0])


def test_bad_scale_range():
    with pytest.raises(ValueError, match="scale_range"):
        augment.sample_geometry(tf.constant([0, 0]), 10, 10, crop_size=8, scale_range=(2.0, 1.0))


@pytest.mark.parametrize("height, width, eval_size, expected", [
    (30, 50, 64, (38, 64)),    # 30 * 64 / 50 = 38.4
    (60, 40, 32, (32, 21)),    # 40 * 32 / 60 = 21.33
    (5, 8, 4, (3, 4)),         # 2.5 rounds up
    (10, 7, 40, (40, 28)),     # upscaling
])
def test_eval_resize_geometry(height, width, eval_size, expected):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, size=(height, width)).astype(np.int32)
    image = rng.integers(0, 256, size=(height, width, 3)).astype(np.uint8)
    out_image, out_mask, valid = augment.eval_resize(image, labels, eval_size)
    nh, nw = expected
    np.testing.assert_array_equal(valid.numpy(), [nh, nw])
    assert out_image.shape == (eval_size, eval_size, 3) and out_image.dtype == tf.float32
    assert out_mask.dtype == tf.int32
    # nearest neighbour with half-pixel centres, in NumPy
    rows = np.minimum(np.floor((np.arange(nh) + 0.5) * height / nh).astype(int), height - 1)
    cols = np.minimum(np.floor((np.arange(nw) + 0.5) * width / nw).astype(int), width - 1)
    np.testing.assert_array_equal(out_mask.numpy()[:nh, :nw], labels[rows][:, cols])
    assert np.all(out_mask.numpy()[nh:] == 255) and np.all(out_mask.numpy()[:, nw:] == 255)
    assert np.all(out_image.numpy()[nh:] == 0) and np.all(out_image.numpy()[:, nw:] == 0)
    assert out_image.numpy()[:nh, :nw].mean() > 50


def _checkerboard(height, width, cell=1) -> np.ndarray:
    """An RGB image of alternating black and white cells: all detail, mean 127.5."""
    rows, cols = np.indices((height, width)) // cell
    return np.repeat((((rows + cols) % 2) * 255).astype(np.uint8)[..., None], 3, axis=-1)


def test_resize_image_filters_when_shrinking():
    """A 1-pixel checkerboard shrunk 3x is mid-grey: the kernel averages over 3x3 blocks
    and more. Plain bilinear samples land on single pixels (centres 3i + 1), so the
    unfiltered result is black or white."""
    image = _checkerboard(48, 36)
    small = augment.resize_image(image, (16, 12)).numpy()
    assert small.shape == (16, 12, 3) and small.dtype == np.float32
    # Interior pixels (the border's kernel is cut off and renormalised).
    np.testing.assert_allclose(small[2:-2, 2:-2], 127.5, atol=8.0)
    aliased = tf.image.resize(image.astype(np.float32), (16, 12), method="bilinear").numpy()
    assert np.abs(aliased[2:-2, 2:-2] - 127.5).max() > 100  # what the filter prevents


def test_resize_image_enlarging_is_plain_bilinear():
    image = np.random.default_rng(0).integers(0, 256, (7, 5, 3)).astype(np.uint8)
    np.testing.assert_allclose(
        augment.resize_image(image, (14, 10)).numpy(),
        tf.image.resize(image.astype(np.float32), (14, 10), method="bilinear").numpy(),
        atol=1e-3)


def test_training_and_evaluation_crops_are_filtered():
    """Both the training crop and the evaluation resize of a shrunk checkerboard are grey."""
    image = _checkerboard(120, 90)  # 3x the 40x30 it is shrunk to
    mask = np.zeros((120, 90), np.uint8)
    crop, _ = _augment(image, mask, 3, crop_size=32, scale_range=(1.0, 1.0), resize_long_side=40)
    valid = crop[4:-4, 4:26]  # inside the 40x30 image, away from the padding
    np.testing.assert_allclose(valid, 127.5, atol=10.0)
    resized, _, size = augment.eval_resize(image, mask.astype(np.int32), 40)
    np.testing.assert_array_equal(size.numpy(), [40, 30])
    np.testing.assert_allclose(resized.numpy()[2:38, 2:28], 127.5, atol=8.0)


@pytest.mark.parametrize("side", [9, 7])
def test_every_crop_placement_is_drawn(side):
    # Scale 1, an 8x8 crop of a 9x9 image (two placements per axis: window at 0 or 1)
    # or of a 7x7 image (pasted at 0 or 1 inside the window). The crop position is
    # uniform over all placements (sample_geometry), so all four must occur; an
    # off-by-one that never draws the last placement leaves only (0, 0).
    labels = np.arange(side * side, dtype=np.uint8).reshape(side, side)
    image = np.repeat(labels[..., None], 3, axis=-1)
    placements = set()
    for seed in range(64):
        _, out_mask = _augment(image, labels, seed, crop_size=8, scale_range=(1.0, 1.0))
        if side > 8:  # the window's top-left source pixel (the smaller of the two corners)
            v = int(min(out_mask[0, 0], out_mask[0, -1]))
            placements.add((v // side, v % side))
        else:  # where the image starts inside the window
            placements.add((int(np.flatnonzero((out_mask != 255).any(axis=1))[0]),
                            int(np.flatnonzero((out_mask != 255).any(axis=0))[0])))
    assert placements == {(0, 0), (0, 1), (1, 0), (1, 1)}, placements
