"""TFRecord feature keys of the ATR-OS dataset, and its encoder and decoder.

The keys follow the TF Model Garden segmentation convention, plus
`image/classes`. They are defined once here and used by the builder, the
decoder and the tests.

Example:
    >>> ex = make_example(jpeg_bytes, png_bytes, source_id="fash_97",
    ...                   height=600, width=400, classes=[0, 2, 3])
    >>> decoded = decode_example(ex.SerializeToString())
    >>> decoded["image"].shape  # [H, W, 3] uint8
"""

from __future__ import annotations

from typing import Iterable

import tensorflow as tf

IMAGE_ENCODED = "image/encoded"
IMAGE_FORMAT = "image/format"
IMAGE_HEIGHT = "image/height"
IMAGE_WIDTH = "image/width"
SOURCE_ID = "image/source_id"
MASK_ENCODED = "image/segmentation/class/encoded"
MASK_FORMAT = "image/segmentation/class/format"
CLASSES = "image/classes"

SPLITS = ("q_train", "s_train", "q_test", "s_test")

FEATURE_SPEC = {
    IMAGE_ENCODED: tf.io.FixedLenFeature((), tf.string),
    IMAGE_FORMAT: tf.io.FixedLenFeature((), tf.string, default_value="jpeg"),
    IMAGE_HEIGHT: tf.io.FixedLenFeature((), tf.int64),
    IMAGE_WIDTH: tf.io.FixedLenFeature((), tf.int64),
    SOURCE_ID: tf.io.FixedLenFeature((), tf.string),
    MASK_ENCODED: tf.io.FixedLenFeature((), tf.string),
    MASK_FORMAT: tf.io.FixedLenFeature((), tf.string, default_value="png"),
    CLASSES: tf.io.VarLenFeature(tf.int64),
}


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _ints(values: Iterable[int]) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def make_example(image_jpeg: bytes, mask_png: bytes, source_id: str,
                 height: int, width: int, classes: Iterable[int]) -> tf.train.Example:
    """One image and its merged-id mask (0–11, 255 ignore) as a tf.train.Example."""
    return tf.train.Example(features=tf.train.Features(feature={
        IMAGE_ENCODED: _bytes(image_jpeg),
        IMAGE_FORMAT: _bytes(b"jpeg"),
        IMAGE_HEIGHT: _ints([height]),
        IMAGE_WIDTH: _ints([width]),
        SOURCE_ID: _bytes(source_id.encode("utf-8")),
        MASK_ENCODED: _bytes(mask_png),
        MASK_FORMAT: _bytes(b"png"),
        CLASSES: _ints(sorted(int(c) for c in classes)),
    }))


def decode_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Serialized Example -> {image [H, W, 3] uint8, mask [H, W] uint8,
    source_id string, classes [n] int32}. Graph-safe (usable in tf.data.map)."""
    parsed = tf.io.parse_single_example(serialized, FEATURE_SPEC)
    image = tf.io.decode_jpeg(parsed[IMAGE_ENCODED], channels=3)
    mask = tf.io.decode_png(parsed[MASK_ENCODED], channels=1)[..., 0]
    height = tf.cast(parsed[IMAGE_HEIGHT], tf.int32)
    width = tf.cast(parsed[IMAGE_WIDTH], tf.int32)
    image = tf.ensure_shape(tf.reshape(image, tf.stack([height, width, 3])), [None, None, 3])
    mask = tf.ensure_shape(tf.reshape(mask, tf.stack([height, width])), [None, None])
    return {
        "image": image,
        "mask": mask,
        "source_id": parsed[SOURCE_ID],
        "classes": tf.cast(tf.sparse.to_dense(parsed[CLASSES]), tf.int32),
    }


def shard_pattern(data_dir: str, split: str) -> str:
    """Glob of a split's shards: `<data_dir>/<split>-*-of-*.tfrecord`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    return f"{data_dir}/{split}-*-of-*.tfrecord"


def shard_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"
