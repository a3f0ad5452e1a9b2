"""Training augmentation and evaluation resizing of (image, mask) pairs (SPEC §7).

Training: optional resize so the long side is `resize_long_side`, random scale in
`scale_range`, padding (image 0, mask 255) and a random crop of `crop_size` (S x S,
or rows x cols for a pair), random horizontal flip. Left/right classes are merged
(SPEC §2), so a flip needs no label swap.

The crop is planned before any pixel is touched: the window of the *source* image
that the crop shows is computed first, only that window is decoded
(`tf.io.decode_and_crop_jpeg`) and resized, straight to its size in the crop,
and the mask is resampled by two row gathers with precomputed nearest-neighbour
indices. Resizing the whole scaled image and cropping afterwards would cost up
to 16x more at scale 2.

Image and mask follow one `Geometry`: per axis, the source window
[start, stop) is resized to `length` pixels placed at `offset` in the crop; the
mask index of each crop pixel is the source pixel nearest to the point the
bilinear image resize samples (half-pixel centres), so labels stay aligned with
the pixels they describe. All randomness is stateless and comes from one seed
tensor, so an episode is a pure function of (seed, element index).

Example:
    >>> geometry = sample_geometry(tf.constant([0, 1]), 600, 400, crop_size=512)  # height, width
    >>> image = augment_image(jpeg_bytes, geometry)   # [512, 512, 3] float32
    >>> mask = augment_mask(mask_uint8, geometry)     # [512, 512] uint8, 255 = pad
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from popnet_tf import classes

IMAGE_PAD = 0.0
MASK_PAD = classes.IGNORE_LABEL


def resize_image(image, size) -> tf.Tensor:
    """Bilinear resize to `size` (rows, cols), low-pass filtered when shrinking: float32.

    Every image of training, evaluation and serving goes through this one function,
    so the model sees the same kind of pixels everywhere. `antialias=True` widens the
    bilinear kernel to the shrink factor (an area-like average): ATR's 400x600 photos
    shrunk 4x for the CPU config otherwise sample one source pixel in 16, and thin
    parts (straps, limbs) and fine textures alias into noise. Enlarging is unchanged.
    """
    return tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear",
                           antialias=True)


class Geometry(NamedTuple):
    """One random draw of the augmentation for one image; axis 0 = rows, 1 = cols.

    The source window [start, stop) is resized to `length` pixels, which land
    at crop position `offset` (before the flip); the rest of the crop is
    padding. `row_index` / `col_index` [S] give, for each crop pixel, the
    nearest source pixel, or the source extent (a padding marker) where the
    crop shows padding; `col_index` is already flipped.
    """
    start: tf.Tensor       # [2] int32
    stop: tf.Tensor        # [2] int32
    length: tf.Tensor      # [2] int32
    offset: tf.Tensor      # [2] int32, >= 0
    row_index: tf.Tensor   # [rows] int32
    col_index: tf.Tensor   # [cols] int32
    flip: tf.Tensor        # bool scalar
    scale: tf.Tensor       # float32 scalar, nominal scale source -> crop

    @property
    def crop_shape(self) -> tuple[int, int]:
        """(rows, cols) of the crop."""
        return int(self.row_index.shape[0]), int(self.col_index.shape[0])


def crop_shape(crop_size) -> tuple[int, int]:
    """(rows, cols) of a crop given as a side S (square) or a (rows, cols) pair.

    Portrait photos such as ATR's (2:3) fill a rows x cols crop of the same shape
    with image; a square crop of their height is one third padding, which costs
    as much to compute as image and teaches nothing (its labels are ignored).

    Example:
        >>> crop_shape(512), crop_shape((144, 112))  # (512, 512), (144, 112)
    """
    if isinstance(crop_size, (tuple, list)):
        if len(crop_size) != 2:
            raise ValueError(f"crop_size must be a side or (rows, cols), got {crop_size!r}")
        rows, cols = (int(v) for v in crop_size)
    else:
        rows = cols = int(crop_size)
    if rows < 1 or cols < 1:
        raise ValueError(f"crop_size must be positive, got {crop_size!r}")
    return rows, cols


def _round(x: tf.Tensor) -> tf.Tensor:
    """Round half up to int32 (tf.round rounds half to even)."""
    return tf.cast(tf.floor(x + 0.5), tf.int32)


def _plan(size, scaled, offset, crop: tuple[int, int]):
    """Plans both axes at once ([2] tensors): source `size` scaled to `scaled`,
    a (rows, cols) `crop` starting at scaled coordinate `offset` (negative =
    padding first).

    Only the visible part of the scaled image is produced: the source window
    that covers it is resized straight to the visible length. Its scale differs
    from the nominal one by at most one source pixel over the window, which a
    random scale does not notice, and image and mask share it exactly.
    """
    ratio = tf.cast(size, tf.float32) / tf.cast(scaled, tf.float32)   # source px per scaled px
    visible_start = tf.maximum(offset, 0)
    visible_stop = tf.minimum(offset + tf.constant(crop, tf.int32), scaled)
    length = visible_stop - visible_start                               # >= 1
    start = tf.cast(tf.floor(tf.cast(visible_start, tf.float32) * ratio), tf.int32)
    stop = tf.cast(tf.math.ceil(tf.cast(visible_stop, tf.float32) * ratio), tf.int32)
    start = tf.clip_by_value(start, 0, size - 1)
    stop = tf.clip_by_value(stop, start + 1, size)
    # Nearest-neighbour source index of every crop pixel: the pixel whose centre
    # is nearest to where the bilinear (half-pixel) resize of the window samples.
    step = tf.cast(stop - start, tf.float32) / tf.cast(length, tf.float32)                         # [2]
    index = []
    for axis in (0, 1):  # rows, cols: the two axes may differ in length
        within = offset[axis] + tf.range(crop[axis], dtype=tf.int32) - visible_start[axis]      # [S_axis]
        source = start[axis] + tf.cast(tf.floor((tf.cast(within, tf.float32) + 0.5) * step[axis]), tf.int32)
        source = tf.clip_by_value(source, start[axis], stop[axis] - 1)
        shown = (within >= 0) & (within < length[axis])
        index.append(tf.where(shown, source, size[axis]))
    return start, stop, length, visible_start - offset, index


def sample_geometry(seed, height, width, *, crop_size,
                    scale_range=(0.5, 2.0), resize_long_side: int | None = None,
                    flip: bool = True) -> Geometry:
    """Draws a random scale, crop position and flip for a `height` x `width` image.

    Args:
        seed: int32/int64 tensor [2], the stateless seed of this image.
        height, width: int32 scalars, the source size.
        crop_size: int S (an S x S crop) or (rows, cols).
        scale_range: (low, high), the random scale, drawn uniformly (paper 0.5-2).
        resize_long_side: int or None; the scale applies after a resize that
            brings the long side to this length (folded into one resize).
        flip: whether a random horizontal flip may happen.

    Returns:
        A `Geometry`. The crop's position is uniform over all placements of the
        crop window on the scaled image; along an axis where the scaled image is
        smaller than the window, the image is placed uniformly inside the window
        instead (padding).

    Example:
        >>> g = sample_geometry(tf.constant([1, 2]), 600, 400, crop_size=512)
    """
    low, high = float(scale_range[0]), float(scale_range[1])
    if not 0 < low <= high:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range!r}")
    crop = crop_shape(crop_size)
    size = tf.cast(tf.stack([height, width]), tf.int32)
    # One draw for everything: scale, row offset, column offset, flip.
    u = tf.random.stateless_uniform([4], seed=seed, dtype=tf.float32)
    scale = low + (high - low) * u[0]
    if resize_long_side:
        scale = scale * float(resize_long_side) / tf.cast(tf.reduce_max(size), tf.float32)
    scaled = tf.maximum(_round(tf.cast(size, tf.float32) * scale), 1)
    window = tf.constant(crop, tf.int32)
    low_offset = tf.minimum(0, scaled - window)
    span = tf.abs(scaled - window) + 1                       # placements per axis
    offset = low_offset + tf.minimum(tf.cast(u[1:3] * tf.cast(span, tf.float32), tf.int32), span - 1)
    do_flip = u[3] < 0.5 if flip else tf.constant(False)
    start, stop, length, place, index = _plan(size, scaled, offset, crop)
    col_index = tf.where(do_flip, tf.reverse(index[1], [0]), index[1])
    return Geometry(start, stop, length, place, index[0], col_index, do_flip, scale)


def augment_mask(mask, geometry: Geometry, table=None) -> tf.Tensor:
    """Resamples a [H, W] uint8 mask into the crop (nearest), padding with 255.

    `table`, an optional 256-entry uint8 lookup (e.g. a stage's label space),
    is applied to the result. Returns [rows, cols] uint8.
    """
    mask = tf.convert_to_tensor(mask)
    # One extra row and column of 255 that the padding indices point at.
    padded = tf.pad(mask, [[0, 1], [0, 1]], constant_values=MASK_PAD)
    # Row gathers copy whole rows; gathering columns through a transpose is
    # ~5x faster than a gather on axis 1, which copies one byte at a time.
    out = tf.gather(padded, geometry.row_index, axis=0)                 # [rows, W+1]
    out = tf.transpose(tf.gather(tf.transpose(out), geometry.col_index, axis=0))   # [rows, cols]
    if table is not None:
        out = tf.gather(tf.convert_to_tensor(table, tf.uint8), tf.cast(out, tf.int32))
    return tf.ensure_shape(out, list(geometry.crop_shape))


def augment_image(image, geometry: Geometry) -> tf.Tensor:
    """Produces the [rows, cols, 3] float32 crop of an image (bilinear, pad 0).

    `image` is either a decoded [H, W, 3] uint8 tensor or the JPEG bytes (a
    scalar string); for bytes only the window the crop shows is decoded.
    """
    rows, cols = geometry.crop_shape
    crop = tf.constant([rows, cols], tf.int32)
    start, stop, length = geometry.start, geometry.stop, geometry.length
    image = tf.convert_to_tensor(image)
    if image.dtype == tf.string:
        window = tf.io.decode_and_crop_jpeg(image, tf.concat([start, stop - start], 0), channels=3)
    else:
        window = tf.slice(image, tf.concat([start, [0]], 0), tf.concat([stop - start, [3]], 0))
    # Flipping the uint8 window is cheaper than flipping the float crop; the
    # placement of a flipped window mirrors too.
    window = tf.cond(geometry.flip, lambda: tf.reverse(window, [1]), lambda: window)
    offset = tf.where(geometry.flip & tf.constant([False, True]),
                      crop - geometry.offset - length, geometry.offset)
    resized = resize_image(window, length)

    def pad():
        # Concatenation with zero blocks: ~4x faster than tf.pad across columns.
        after = crop - offset - length
        top = tf.zeros(tf.stack([offset[0], length[1], 3]))
        bottom = tf.zeros(tf.stack([after[0], length[1], 3]))
        rows = tf.concat([top, resized, bottom], 0)
        left = tf.zeros(tf.stack([crop[0], offset[1], 3]))
        right = tf.zeros(tf.stack([crop[0], after[1], 3]))
        return tf.concat([left, rows, right], 1)

    out = tf.cond(tf.reduce_all(length == crop), lambda: resized, pad)
    return tf.ensure_shape(out, [rows, cols, 3])


def random_augment(image, mask, seed, *, crop_size, scale_range=(0.5, 2.0),
                   resize_long_side: int | None = None, table=None):
    """Augments a decoded pair: returns ([rows, cols, 3] float32, [rows, cols] uint8)
    for `crop_size` S (rows = cols = S) or (rows, cols).

    Example:
        >>> img, msk = random_augment(image_u8, mask_u8, tf.constant([0, 5]), crop_size=128)
    """
    shape = tf.shape(mask)
    geometry = sample_geometry(seed, shape[0], shape[1], crop_size=crop_size,
                               scale_range=scale_range, resize_long_side=resize_long_side)
    return augment_image(image, geometry), augment_mask(mask, geometry, table)


def eval_size_of(height, width, eval_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Size after an aspect-preserving resize that fits eval_size x eval_size:
    the long side becomes eval_size, the short side round(short * eval_size / long)."""
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    long_side = tf.maximum(height, width)
    # Integer round-half-up, so the long side is exactly eval_size.
    new_h = tf.maximum((2 * height * eval_size + long_side) // (2 * long_side), 1)
    new_w = tf.maximum((2 * width * eval_size + long_side) // (2 * long_side), 1)
    return new_h, new_w


def eval_resize(image, mask, eval_size: int):
    """Aspect-preserving resize to fit eval_size x eval_size, then pad bottom/right.

    Args:
        image: [H, W, 3] uint8 or float.
        mask: [H, W] integer mask.
        eval_size: int E.
    Returns:
        image [E, E, 3] float32 (bilinear, pad 0), mask [E, E] int32 (nearest,
        pad 255), valid_size [2] int32 = (rows, cols) of the unpadded region.

    Example:
        >>> img, msk, valid = eval_resize(image_u8, mask_u8, 512)
    """
    out_mask, size = eval_resize_mask(mask, eval_size)
    resized = resize_image(image, size)
    pad = [[0, eval_size - size[0]], [0, eval_size - size[1]], [0, 0]]
    out_image = tf.pad(resized, pad, constant_values=IMAGE_PAD)
    return tf.ensure_shape(out_image, [eval_size, eval_size, 3]), out_mask, size


def eval_resize_mask(mask, eval_size: int):
    """The mask half of `eval_resize`: ([E, E] int32, valid_size [2] int32)."""
    shape = tf.shape(mask)
    new_h, new_w = eval_size_of(shape[0], shape[1], eval_size)
    size = tf.stack([new_h, new_w])
    resized = tf.image.resize(tf.cast(mask, tf.int32)[..., None], size, method="nearest")[..., 0]
    out = tf.pad(resized, [[0, eval_size - new_h], [0, eval_size - new_w]], constant_values=MASK_PAD)
    return tf.ensure_shape(out, [eval_size, eval_size]), size
