"""tf.data pipelines of the ATR-OS dataset: stage-1 batches, one-shot training
episodes and test episodes (docs/DESIGN.md "Episodes", SPEC §3-§5, §7).

Images are float32 in 0..255; masks are int32 in the stage's label space
(`classes.merged_to_stage_table`), 255 = ignore and padding.

Training (infinite, batched, prefetched; take `steps_per_epoch` from it):
- query from q_train, support from s_train, each split reshuffled every epoch
  with a seeded shuffle, so a pair is a random query with a random support;
- the fold's novel classes become background in both masks (SPEC §4);
- a support is used only if a foreground class survives fold masking (checked
  on the `image/classes` feature before any decoding) *and* augmentation (a
  crop can cut all of it away: the crop is redrawn up to `MAX_CROP_ATTEMPTS`
  times, on the mask alone, and an episode that still has none is dropped);
- k-way: query classes absent from the augmented support become background;
  one-way: a class c drawn from the augmented support's classes, both masks
  binary (c on c, 0 elsewhere, 255 kept); `class_id` = c (k-way: -1).

Every random choice is a stateless op seeded by (seed, element index), the
shuffles are seeded and the pipeline keeps its order under parallelism, so the
same seed gives the same episodes.

Test (unbatched, in a fixed order): supports and queries resized, aspect kept,
to fit `eval_size` and padded (bottom/right); no fold masking. k-way: every
q_test query with each of the fixed supports of `manifest["test_supports"]`,
query-major; one-way: `pairs_per_class` seeded (support, query) pairs per
foreground class, both images containing the class. The query's ground truth
(`query_mask` and the full-resolution `query_label`) keeps only classes present
in the support mask the model is given (the resized one); others become 0.

Example:
    >>> ds = train_episodes("tfrecords/synthetic", stage=3, fold=1, batch_size=2,
    ...                     crop_size=512, seed=0)
    >>> batch = next(iter(ds))
    >>> batch["query_image"].shape, batch["support_mask"].dtype
    (TensorShape([2, 512, 512, 3]), tf.int32)
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf

from popnet_tf import classes
from popnet_tf.data import augment, features

# Crop redraws before a support whose foreground the crop keeps missing is dropped.
MAX_CROP_ATTEMPTS = 8
KWAY, ONEWAY = "kway", "oneway"
_IGNORE = classes.IGNORE_LABEL
# Salts that keep the random streams of the different uses of one seed apart.
_SALT_QUERY_SHUFFLE, _SALT_SUPPORT_SHUFFLE, _SALT_EPISODE, _SALT_STAGE1 = 11, 12, 13, 14


# ----------------------------------------------------------------------------
# Reading the dataset.


def load_manifest(data_dir: str) -> dict:
    """Reads `data_dir/manifest.json`, with an error that says how to build it.

    Example:
        >>> load_manifest("tfrecords/synthetic")["test_supports"][:2]
    """
    path = os.path.join(data_dir, "manifest.json")
    if not tf.io.gfile.exists(path):
        # The ATR download itself given as the dataset: build from it into another folder
        # (the builder will not write into a folder that is not a dataset).
        if tf.io.gfile.isdir(os.path.join(data_dir, "JPEGImages")):
            raise FileNotFoundError(
                f"{path}: no manifest; {data_dir} is an ATR-layout folder, not a built ATR-OS "
                f"dataset. Build one from it with `python -m popnet_tf.data.build_atr_os "
                f"--atr_root {data_dir} --out {data_dir.rstrip('/')}_atr_os` and use that.")
        raise FileNotFoundError(
            f"{path}: no manifest; {data_dir} is not a built ATR-OS dataset. Build one with "
            f"`python -m popnet_tf.data.build_atr_os --atr_root ATR --out {data_dir}`.")
    with tf.io.gfile.GFile(path) as f:
        manifest = json.load(f)
    if "splits" not in manifest:
        raise ValueError(f"{path}: no 'splits' entry; rebuild the dataset with "
                         f"popnet_tf.data.build_atr_os")
    return manifest


def split_files(data_dir: str, split: str, manifest: dict | None = None) -> list[str]:
    """Shard paths of a split in name order (= the builder's list order).

    Example:
        >>> split_files("tfrecords/synthetic", "q_test")
        ['tfrecords/synthetic/q_test-00000-of-00001.tfrecord']
    """
    manifest = manifest or load_manifest(data_dir)
    entry = manifest["splits"].get(split)
    if entry is None:
        raise ValueError(f"{data_dir}/manifest.json: no split {split!r}; "
                         f"found {sorted(manifest['splits'])}")
    names = sorted(entry.get("shards", {}))
    if names:
        paths = [os.path.join(data_dir, n) for n in names]
        missing = [p for p in paths if not tf.io.gfile.exists(p)]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: listed in {data_dir}/manifest.json but "
                                    f"missing ({len(missing)} shards missing); rebuild the dataset")
        return paths
    paths = sorted(tf.io.gfile.glob(features.shard_pattern(data_dir, split)))
    if not paths:
        raise FileNotFoundError(f"{features.shard_pattern(data_dir, split)}: no shards")
    return paths


def _stage_table(stage: int, fold: int | None = None, fold_set: str = classes.DEFAULT_FOLD_SET):
    """merged id -> stage label, then (training) the fold's novel classes -> 0."""
    table = classes.merged_to_stage_table(stage)
    if fold is not None and stage > 1:
        table = classes.fold_mask_table(stage, fold, fold_set)[table]
    return table


def _parse(serialized, decode_image: bool) -> dict:
    """Serialized example -> {"image": uint8 [H, W, 3] or the JPEG bytes,
    "mask": uint8 [H, W] merged ids, "classes": int32 [n], "source_id"}.

    With `decode_image=False` the JPEG stays encoded, so that the augmentation
    decodes only the window its crop needs.
    """
    if decode_image:
        return features.decode_example(serialized)
    parsed = tf.io.parse_single_example(serialized, features.FEATURE_SPEC)
    height = tf.cast(parsed[features.IMAGE_HEIGHT], tf.int32)
    width = tf.cast(parsed[features.IMAGE_WIDTH], tf.int32)
    mask = tf.io.decode_png(parsed[features.MASK_ENCODED], channels=1)[..., 0]
    return {
        "image": parsed[features.IMAGE_ENCODED],
        "mask": tf.ensure_shape(tf.reshape(mask, tf.stack([height, width])), [None, None]),
        "source_id": parsed[features.SOURCE_ID],
        "classes": tf.cast(tf.sparse.to_dense(parsed[features.CLASSES]), tf.int32),
    }


def _parse_classes(serialized) -> tf.Tensor:
    """Only the `image/classes` feature (merged ids present): no decoding."""
    parsed = tf.io.parse_single_example(serialized, {features.CLASSES: features.FEATURE_SPEC[features.CLASSES]})
    return tf.cast(tf.sparse.to_dense(parsed[features.CLASSES]), tf.int32)


def _has_foreground(label_ids, table) -> tf.Tensor:
    """Whether any of the merged ids maps to a foreground label under `table`."""
    mapped = tf.gather(tf.constant(table, tf.int32), label_ids)
    return tf.reduce_any((mapped > 0) & (mapped != _IGNORE))


def _presence(mask_u8) -> tf.Tensor:
    """[256] bool: which label values occur in a uint8 mask."""
    counts = tf.math.bincount(tf.reshape(tf.cast(mask_u8, tf.int32), [-1]), minlength=256, maxlength=256)
    return tf.ensure_shape(counts > 0, [256])


def _lookup(mask_u8, table) -> tf.Tensor:
    """Applies a 256-entry table to a uint8 mask; returns uint8."""
    return tf.gather(tf.cast(table, tf.uint8), tf.cast(mask_u8, tf.int32))


def _keep_table(keep) -> tf.Tensor:
    """256-entry uint8 table: label v -> v where keep[v], else 0; 255 -> 255."""
    ids = tf.range(256, dtype=tf.int32)
    table = tf.where(keep | (ids == _IGNORE), ids, 0)
    return tf.cast(table, tf.uint8)


def _plain(fn):
    """Marks a tf.data function as plain graph code: it uses tf.cond /
    tf.while_loop explicitly, and AutoGraph's source conversion would only
    add seconds to every pipeline construction."""
    return tf.autograph.experimental.do_not_convert(fn)


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    # Parallelism across elements, not inside one: the per-episode ops are
    # small, and handing each to the intra-op pool costs more than it saves.
    options.threading.max_intra_op_parallelism = 1
    # No autotuning: its optimisation thread made deleting an epoch's iterator block
    # for 3-4 s (data alone) and 10-13 s (while training, 2 cores) in about half the
    # epochs: 41 s instead of 28-33 s for a stage-1 epoch of the CPU config. Without
    # it, AUTOTUNE parallelism is the number of schedulable cores, and the batches are
    # the same (deterministic order).
    options.autotune.enabled = False
    return options


def _derive_seed(seed: int, salt: int) -> int:
    """A shuffle seed for one use of the run's seed (fits int64)."""
    return (int(seed) * 1_000_003 + salt) % (2 ** 31 - 1)


def _train_stream(data_dir: str, splits, manifest: dict, *, seed: int, salt: int,
                  cache_decoded: bool, shuffle_buffer: int | None) -> tf.data.Dataset:
    """Infinite, reshuffled-per-epoch stream of a split's examples: serialized
    strings, or (`cache_decoded`) decoded dicts held in memory after the first epoch."""
    files = [p for s in splits for p in split_files(data_dir, s, manifest)]
    count = sum(int(manifest["splits"][s]["count"]) for s in splits)
    ds = tf.data.TFRecordDataset(files)
    if cache_decoded:
        ds = ds.map(_plain(lambda s: _parse(s, decode_image=True)), num_parallel_calls=tf.data.AUTOTUNE).cache()
    # Default: the whole split fits the buffer, so each epoch is a uniform
    # permutation (random pairs as SPEC §5), not only a local shuffle.
    buffer = max(1, count if shuffle_buffer is None else min(int(shuffle_buffer), count))
    return ds.shuffle(buffer, seed=_derive_seed(seed, salt), reshuffle_each_iteration=True).repeat()


def _check_supports_exist(data_dir: str, manifest: dict, table, stage: int, fold: int) -> None:
    """Fails early where no s_train image can be a support (the support filter
    would otherwise wait forever on an infinite stream)."""
    per_class = manifest["splits"]["s_train"].get("per_class")
    if not per_class:
        return  # no statistics: nothing to check
    usable = [name for name, n in per_class.items()
              if int(n) > 0 and name in classes.MERGED_NAMES
              and table[classes.MERGED_NAMES.index(name)] not in (0, _IGNORE)]
    if not usable:
        raise ValueError(f"{data_dir}/manifest.json: no s_train image holds a foreground class "
                         f"of stage {stage} outside fold {fold}'s novel classes; nothing can be a support")


def check_supports(data_dir: str, *, stage: int, fold: int,
                   fold_set: str = classes.DEFAULT_FOLD_SET) -> None:
    """Raises ValueError where no s_train image can be a training support of `stage`
    and `fold` (what `train_episodes` would otherwise find at the stage's start)."""
    _check_supports_exist(data_dir, load_manifest(data_dir), _stage_table(stage, fold, fold_set),
                          stage, fold)


def _check_common(stage: int, crop_size, batch_size: int, scale_range) -> None:
    if stage not in classes.STAGE_NUM_CLASSES:
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    augment.crop_shape(crop_size)  # a positive side or (rows, cols)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
        raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}")


# ----------------------------------------------------------------------------
# Training.


def stage1_train_dataset(data_dir: str, **kwargs) -> tf.data.Dataset:
    """Infinite batches for the supervised foreground stage (SPEC §3) from q_train ∪ s_train:
    `supervised_train_dataset` with stage 1's labels (0 background, 1 human, 255 ignore).

    Example:
        >>> ds = stage1_train_dataset("tfrecords/synthetic", batch_size=2, crop_size=128,
        ...                           resize_long_side=160)
    """
    return supervised_train_dataset(data_dir, stage=1, **kwargs)


def supervised_train_dataset(data_dir: str, *, batch_size: int, crop_size, stage: int = 1,
                             fold: int | None = None,
                             fold_set: str = classes.DEFAULT_FOLD_SET,
                             scale_range=(0.5, 2.0), resize_long_side: int | None = None,
                             seed: int = 0, cache_decoded: bool = False,
                             shuffle_buffer: int | None = None) -> tf.data.Dataset:
    """Infinite batches of plain (image, mask) pairs from q_train ∪ s_train, labelled in
    `stage`'s classes: stage 1 trains on them, and `scripts/supervised_reference.py` trains
    a supervised stage-3 reference on them (fold's novel classes -> background).

    Args:
        data_dir: built ATR-OS dataset.
        stage: label space (SPEC §3): 1 foreground, 2 body areas, 3 fine classes.
        fold, fold_set: with a fold (stages 2 and 3), its novel classes become
            background, as in the one-shot stages' training (SPEC §4).
        batch_size, crop_size: batch B and crop side S, or the crop's (rows, cols).
        scale_range, resize_long_side: augmentation (see `augment.sample_geometry`).
        seed: run seed; the same seed gives the same batches.
        cache_decoded: keep decoded images in memory (small datasets only).
        shuffle_buffer: shuffle buffer; None = the whole split.
    Returns:
        Dataset of {"image": [B, S, S, 3] float32, "mask": [B, S, S] int32 (stage
        labels, 255 ignore)} ([B, rows, cols, ...] for a (rows, cols) crop).

    Example:
        >>> ds = supervised_train_dataset("tfrecords/synthetic", stage=3, fold=1,
        ...                               batch_size=8, crop_size=112, resize_long_side=144)
    """
    _check_common(stage, crop_size, batch_size, scale_range)
    manifest = load_manifest(data_dir)
    table = _stage_table(stage, fold, fold_set)
    stream = _train_stream(data_dir, ("q_train", "s_train"), manifest, seed=seed, salt=_SALT_STAGE1,
                           cache_decoded=cache_decoded, shuffle_buffer=shuffle_buffer)

    def make(index, element):
        example = element if cache_decoded else _parse(element, decode_image=False)
        key = tf.stack([tf.constant(seed, tf.int64), index])
        key = tf.random.experimental.stateless_fold_in(key, _SALT_STAGE1)
        shape = tf.shape(example["mask"])
        geometry = augment.sample_geometry(key, shape[0], shape[1], crop_size=crop_size,
                                           scale_range=scale_range, resize_long_side=resize_long_side)
        return {"image": augment.augment_image(example["image"], geometry),
                "mask": tf.cast(augment.augment_mask(example["mask"], geometry, table), tf.int32)}

    ds = stream.enumerate().map(_plain(make), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE).with_options(_options())


def train_episodes(data_dir: str, *, stage: int, fold: int, fold_set: str = classes.DEFAULT_FOLD_SET,
                   way: str = KWAY, batch_size: int, crop_size, scale_range=(0.5, 2.0),
                   resize_long_side: int | None = None, seed: int = 0,
                   cache_decoded: bool = False, shuffle_buffer: int | None = None,
                   support_crop_size=None) -> tf.data.Dataset:
    """Infinite batches of one-shot training episodes (SPEC §4, §5, §7).

    Args:
        data_dir: built ATR-OS dataset.
        stage: 2 or 3 (1 is accepted: its only foreground class is "human").
        fold, fold_set: the fold whose novel classes are hidden (SPEC §4).
        way: "kway" or "oneway".
        batch_size, crop_size: batch B and crop side S (paper: 2; 512 k-way, 576 one-way),
            or the crop's (rows, cols).
        scale_range, resize_long_side: augmentation (see `augment.sample_geometry`).
        seed: run seed; the same seed gives the same episodes.
        cache_decoded: keep decoded images in memory (small datasets only).
        shuffle_buffer: shuffle buffer per split; None = the whole split.
        support_crop_size: the support's own crop, a side or (rows, cols); None: the
            query's `crop_size` (e.g. whole-image supports with cropped queries).
    Returns:
        Dataset of {"query_image", "support_image": [B, S, S, 3] float32,
        "query_mask", "support_mask": [B, S, S] int32, "class_id": [B] int32}; the
        support's S is its own crop's where `support_crop_size` is given.

    Example:
        >>> ds = train_episodes("tfrecords/synthetic", stage=2, fold=1, way="oneway",
        ...                     batch_size=2, crop_size=128, resize_long_side=160, seed=3)
    """
    _check_common(stage, crop_size, batch_size, scale_range)
    support_crop_size = support_crop_size or crop_size
    crop_rows, crop_cols = augment.crop_shape(support_crop_size)  # the support's crop
    if way not in (KWAY, ONEWAY):
        raise ValueError(f"way must be {KWAY!r} or {ONEWAY!r}, got {way!r}")
    classes.novel_ids(stage, fold, fold_set)  # validates fold and fold_set
    manifest = load_manifest(data_dir)
    num_classes = classes.STAGE_NUM_CLASSES[stage]
    table = _stage_table(stage, fold, fold_set)                       # [256] uint8
    queries = _train_stream(data_dir, ("q_train",), manifest, seed=seed, salt=_SALT_QUERY_SHUFFLE,
                            cache_decoded=cache_decoded, shuffle_buffer=shuffle_buffer)
    supports = _train_stream(data_dir, ("s_train",), manifest, seed=seed, salt=_SALT_SUPPORT_SHUFFLE,
                             cache_decoded=cache_decoded, shuffle_buffer=shuffle_buffer)
    _check_supports_exist(data_dir, manifest, table, stage, fold)
    # Cheap pre-filter: a support without foreground after fold masking is
    # never decoded.
    table_t = tf.constant(table, tf.int32)
    supports = supports.filter(_plain(lambda el: _has_foreground(
        el["classes"] if cache_decoded else _parse_classes(el), table)))

    def crop_support(index, query, support):
        """Stage 1 of an episode: parse both, crop the support's mask until it
        keeps a foreground class. Cheap (no JPEG), so that the episodes
        dropped here cost little and the heavy stage 2 fuses with `batch`."""
        query = query if cache_decoded else _parse(query, decode_image=False)
        support = support if cache_decoded else _parse(support, decode_image=False)
        key = tf.stack([tf.constant(seed, tf.int64), index])
        key = tf.random.experimental.stateless_fold_in(key, _SALT_EPISODE)
        support_key, query_key, class_key = tf.unstack(tf.random.experimental.stateless_split(key, 3))
        support_shape = tf.shape(support["mask"])

        def attempt_crop(attempt, *unused):
            geometry = augment.sample_geometry(
                tf.random.experimental.stateless_fold_in(support_key, attempt + 1),
                support_shape[0], support_shape[1], crop_size=support_crop_size,
                scale_range=scale_range, resize_long_side=resize_long_side)
            merged = augment.augment_mask(support["mask"], geometry)   # merged ids, no lookup yet
            # Labels present after the stage/fold lookup, from the merged ids
            # present: a 256-vector operation instead of a pass over the crop.
            present = tf.math.unsorted_segment_max(
                tf.cast(_presence(merged), tf.int32), table_t, 256) > 0
            return attempt + 1, geometry, merged, present

        def no_foreground(attempt, geometry, merged, present):
            return (attempt < MAX_CROP_ATTEMPTS - 1) & ~tf.reduce_any(present[1:_IGNORE])

        # Redraw the crop (mask only) until it keeps a foreground class. The
        # loop starts from an empty draw (attempt -1) so that the augmentation
        # is traced once.
        empty = augment.Geometry(
            start=tf.zeros([2], tf.int32), stop=tf.ones([2], tf.int32), length=tf.ones([2], tf.int32),
            offset=tf.zeros([2], tf.int32), row_index=tf.zeros([crop_rows], tf.int32),
            col_index=tf.zeros([crop_cols], tf.int32), flip=tf.constant(False), scale=tf.constant(0.0))
        _, s_geometry, s_merged, present = tf.while_loop(
            no_foreground, attempt_crop,
            (tf.constant(-1), empty, tf.zeros([crop_rows, crop_cols], tf.uint8), tf.zeros([256], tf.bool)))
        return {"query": {"image": query["image"], "mask": query["mask"]},
                "support_image": support["image"], "support_geometry": s_geometry,
                "support_merged": s_merged, "present": present,
                "query_key": query_key, "class_key": class_key}

    def finish(e):
        """Stage 2: images, the query's crop, labels and the one-way class."""
        present = e["present"]                                        # [256] bool, stage labels
        query = e["query"]
        shape = tf.shape(query["mask"])
        q_geometry = augment.sample_geometry(e["query_key"], shape[0], shape[1], crop_size=crop_size,
                                             scale_range=scale_range, resize_long_side=resize_long_side)
        if way == KWAY:
            class_id = tf.constant(-1, tf.int32)
            keep = present
            s_table = table_t
        else:
            # c uniform over the support's foreground classes.
            logits = tf.where(present[1:num_classes], 0.0, -1e9)[None]
            class_id = tf.cast(tf.random.stateless_categorical(logits, 1, seed=e["class_key"])[0, 0],
                               tf.int32) + 1
            keep = tf.range(256) == class_id
            s_table = tf.gather(_keep_table(keep), table_t)
        # One lookup per mask composes stage mapping, fold masking and (query)
        # the support's classes or (one-way) the binary class mask.
        q_table = tf.gather(_keep_table(keep), table_t)
        return {
            "query_image": augment.augment_image(query["image"], q_geometry),
            "support_image": augment.augment_image(e["support_image"], e["support_geometry"]),
            "query_mask": tf.cast(augment.augment_mask(query["mask"], q_geometry, q_table), tf.int32),
            "support_mask": tf.cast(_lookup(e["support_merged"], s_table), tf.int32),
            "class_id": class_id,
        }

    ds = tf.data.Dataset.zip(queries, supports).enumerate()
    ds = ds.map(_plain(lambda i, qs: crop_support(i, *qs)), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.filter(_plain(lambda e: tf.reduce_any(e["present"][1:_IGNORE])))
    ds = ds.map(_plain(finish), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE).with_options(_options())


# ----------------------------------------------------------------------------
# Test.


def _eval_example(example: dict, table, eval_size: int) -> dict:
    """Decoded example -> eval-resized image and mask, and the full-size label."""
    label = tf.gather(tf.constant(table, tf.int32), tf.cast(example["mask"], tf.int32))
    image, mask, valid_size = augment.eval_resize(example["image"], label, eval_size)
    return {"image": image, "mask": mask, "label": label, "valid_size": valid_size,
            "source_id": example["source_id"]}


def test_supports(data_dir: str, *, stage: int, eval_size: int) -> dict:
    """The fixed test supports of `manifest["test_supports"]` (SPEC §5), in that order.

    Returns:
        {"image": [N, E, E, 3] float32, "mask": [N, E, E] int32 (stage labels,
        pad 255), "valid_size": [N, 2] int32, "source_id": [N] string}, N = 10
        for a dataset built by build_atr_os. No fold masking (test).

    Example:
        >>> sup = test_supports("tfrecords/synthetic", stage=3, eval_size=512)
        >>> sup["image"].shape
        TensorShape([10, 512, 512, 3])
    """
    manifest = load_manifest(data_dir)
    ids = [str(i) for i in manifest.get("test_supports", [])]
    if not ids:
        raise ValueError(f"{data_dir}/manifest.json: no 'test_supports'; rebuild the dataset "
                         f"with popnet_tf.data.build_atr_os")
    table = classes.merged_to_stage_table(stage)
    wanted = tf.constant(ids)
    ds = tf.data.TFRecordDataset(split_files(data_dir, "s_test", manifest))
    ds = ds.filter(_plain(lambda s: tf.reduce_any(tf.io.parse_single_example(
        s, {features.SOURCE_ID: features.FEATURE_SPEC[features.SOURCE_ID]})[features.SOURCE_ID] == wanted)))
    ds = ds.map(_plain(lambda s: _eval_example(features.decode_example(s), table, eval_size)))
    found = {}
    for element in ds:
        found[element["source_id"].numpy().decode("utf-8")] = element
    missing = [i for i in ids if i not in found]
    if missing:
        raise ValueError(f"{data_dir}/manifest.json: test supports {missing} are not in the "
                         f"s_test shards; rebuild the dataset")
    chosen = [found[i] for i in ids]
    return {
        "image": tf.stack([e["image"] for e in chosen]),
        "mask": tf.stack([e["mask"] for e in chosen]),
        "valid_size": tf.stack([e["valid_size"] for e in chosen]),
        "source_id": tf.constant(ids),
    }


def test_queries(data_dir: str, *, stage: int, eval_size: int) -> tf.data.Dataset:
    """q_test in file order, resized and padded for evaluation.

    Returns:
        Unbatched dataset of {"image": [E, E, 3] float32, "mask": [E, E] int32
        (nearest, pad 255), "label": [h, w] int32 at the original resolution,
        "valid_size": [2] int32 (rows, cols of the unpadded region),
        "source_id": string}.

    Example:
        >>> for q in test_queries("tfrecords/synthetic", stage=3, eval_size=512).take(1):
        ...     q["label"].shape  # original size
    """
    if stage not in classes.STAGE_NUM_CLASSES:
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    table = classes.merged_to_stage_table(stage)
    manifest = load_manifest(data_dir)
    ds = tf.data.TFRecordDataset(split_files(data_dir, "q_test", manifest))
    count = manifest["splits"]["q_test"].get("count")
    if count is not None:  # known length: progress bars show a total (and a short file fails)
        ds = ds.apply(tf.data.experimental.assert_cardinality(int(count)))
    ds = ds.map(_plain(lambda s: _eval_example(features.decode_example(s), table, eval_size)),
                num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def _pair(query: dict, support: dict, keep, class_id) -> dict:
    """A test pair; query mask and label keep only the classes in `keep` [256]."""
    relabel = tf.cast(_keep_table(keep), tf.int32)
    return {
        "query_image": query["image"],
        "support_image": support["image"],
        "query_mask": tf.gather(relabel, query["mask"]),
        "support_mask": support["mask"],
        "class_id": tf.cast(class_id, tf.int32),
        "query_label": tf.gather(relabel, query["label"]),
        "valid_size": query["valid_size"],
        "query_id": query["source_id"],
        "support_id": support["source_id"],
    }


def _class_lists(data_dir: str, split: str, manifest: dict):
    """Eagerly reads a split's serialized records and merged class lists."""
    ds = tf.data.TFRecordDataset(split_files(data_dir, split, manifest))
    records, class_lists = [], []
    for s in ds:
        records.append(s.numpy())
        class_lists.append(_parse_classes(s).numpy())
    return records, class_lists


def test_episodes(data_dir: str, *, stage: int, fold: int, fold_set: str = classes.DEFAULT_FOLD_SET,
                  way: str = KWAY, eval_size: int, pairs_per_class: int = 500,
                  seed: int = 0) -> tf.data.Dataset:
    """Test pairs (SPEC §5). No fold masking at test: base and novel classes are
    both parsed; `fold` and `fold_set` are only validated here (the metrics use them).

    k-way: every q_test query (file order) with each fixed support, query-major.
    One-way: for each foreground class c of the stage, `pairs_per_class` pairs
    (support from s_test, query from q_test, both containing c) drawn with
    `seed`; a class without such images is skipped with a warning. The support
    is chosen among images whose *resized* mask still shows c.

    Returns:
        Unbatched dataset of {"query_image", "support_image": [E, E, 3] float32,
        "query_mask", "support_mask": [E, E] int32, "class_id": int32 (k-way -1),
        "query_label": [h, w] int32, "valid_size": [2] int32, "query_id",
        "support_id": string}; query_mask / query_label hold 0 for classes
        absent from the support mask.

    Example:
        >>> ds = test_episodes("tfrecords/synthetic", stage=3, fold=1, way="kway", eval_size=512)
    """
    if way not in (KWAY, ONEWAY):
        raise ValueError(f"way must be {KWAY!r} or {ONEWAY!r}, got {way!r}")
    classes.novel_ids(stage, fold, fold_set)  # validates fold and fold_set
    if way == KWAY:
        return _kway_test(data_dir, stage, eval_size)
    return _oneway_test(data_dir, stage, eval_size, pairs_per_class, seed)


def _kway_test(data_dir: str, stage: int, eval_size: int) -> tf.data.Dataset:
    supports = test_supports(data_dir, stage=stage, eval_size=eval_size)
    num_supports = int(supports["image"].shape[0])
    present = tf.stack([_presence(m) for m in tf.cast(supports["mask"], tf.uint8)])  # [N, 256]
    support_ds = tf.data.Dataset.from_tensor_slices(
        {"image": supports["image"], "mask": supports["mask"], "source_id": supports["source_id"],
         "present": present}).repeat()
    queries = test_queries(data_dir, stage=stage, eval_size=eval_size)
    # Each query repeated once per support, zipped with the cycling supports:
    # query-major order, support index = pair index mod N.
    repeated = queries.flat_map(_plain(lambda q: tf.data.Dataset.from_tensors(q).repeat(num_supports)))
    ds = tf.data.Dataset.zip(repeated, support_ds)
    ds = ds.map(_plain(lambda q, s: _pair(q, s, s["present"], -1)), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def _oneway_test(data_dir: str, stage: int, eval_size: int, pairs_per_class: int,
                 seed: int) -> tf.data.Dataset:
    from absl import logging

    manifest = load_manifest(data_dir)
    table = classes.merged_to_stage_table(stage)
    q_records, q_classes = _class_lists(data_dir, "q_test", manifest)
    s_records, _ = _class_lists(data_dir, "s_test", manifest)
    num_classes = classes.STAGE_NUM_CLASSES[stage]
    # Query: class in its label at full resolution (what the metrics score).
    q_has = np.zeros((len(q_records), 256), bool)
    for i, ids in enumerate(q_classes):
        q_has[i, table[ids]] = True
    # Support: class still present in the resized mask the model is given.
    s_has = np.zeros((len(s_records), 256), bool)
    mask_only = tf.data.Dataset.from_tensor_slices(s_records).map(
        _plain(lambda s: _resized_presence(s, table, eval_size)), num_parallel_calls=tf.data.AUTOTUNE)
    for i, row in enumerate(mask_only):
        s_has[i] = row.numpy()
    rng = np.random.default_rng(seed)
    s_index, q_index, class_ids = [], [], []
    for c in range(1, num_classes):
        s_pool, q_pool = np.flatnonzero(s_has[:, c]), np.flatnonzero(q_has[:, c])
        if not len(s_pool) or not len(q_pool):
            logging.warning("%s: no s_test/q_test images with class %r; one-way test skips it",
                            data_dir, classes.STAGE_CLASS_NAMES[stage][c])
            continue
        s_index.append(rng.choice(s_pool, pairs_per_class))
        q_index.append(rng.choice(q_pool, pairs_per_class))
        class_ids.append(np.full(pairs_per_class, c))
    if not class_ids:
        raise ValueError(f"{data_dir}: no foreground class occurs in both q_test and s_test")
    s_records_t = tf.constant(s_records)
    q_records_t = tf.constant(q_records)

    def make(s_i, q_i, c):
        def load(record):
            return _eval_example(features.decode_example(record), table, eval_size)
        support = load(tf.gather(s_records_t, s_i))
        query = load(tf.gather(q_records_t, q_i))
        keep = tf.range(256) == c
        mask = support["mask"]
        support["mask"] = tf.where((mask == c) | (mask == _IGNORE), mask, 0)
        return _pair(query, support, keep, c)

    ds = tf.data.Dataset.from_tensor_slices(
        (np.concatenate(s_index), np.concatenate(q_index), np.concatenate(class_ids).astype(np.int32)))
    ds = ds.map(_plain(make), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def _resized_presence(serialized, table, eval_size: int) -> tf.Tensor:
    """[256] presence of labels in the eval-resized stage mask of an example
    (the mask alone is decoded)."""
    parsed = tf.io.parse_single_example(serialized, features.FEATURE_SPEC)
    mask = tf.io.decode_png(parsed[features.MASK_ENCODED], channels=1)[..., 0]
    label = tf.gather(tf.constant(table, tf.int32), tf.cast(mask, tf.int32))
    return _presence(augment.eval_resize_mask(label, eval_size)[0])
