"""Class prototypes from a support mask (Eq. 1) and the dynamic prototype store (Eq. 2).

Both layers keep the class axis as a tensor axis: prototypes are `[B, C, K]` with a
presence mask `[B, C]` saying which classes the support holds, so no code loops over
classes. Prototypes are computed in float32 even under mixed precision (STYLE numerics).

Example:
    >>> static, presence = MaskedAveragePooling(12)(features, support_mask)
    >>> p_hat = PrototypeStore(12, 256)(static, presence, training=True)
"""

from __future__ import annotations

import keras
import tensorflow as tf


def _area_downsample_axis0(x, n_out):
    """Area average of `x` along axis 0 from its length n_in down to `n_out` cells.

    Output cell o covers [o·s, (o+1)·s) of the input, s = n_in / n_out ≥ 1, so each
    input pixel [i, i+1) overlaps at most two cells: the one it starts in and the next.
    Two weighted segment sums give exactly tf.image.resize(method="area"), in
    O(size of x), and unlike ResizeArea they have GPU and XLA kernels.
    """
    n_in = tf.shape(x)[0]
    scale = tf.cast(n_in, tf.float32) / tf.cast(n_out, tf.float32)
    start = tf.cast(tf.range(n_in), tf.float32)  # pixel i spans [start, start + 1)
    first = tf.minimum(tf.cast(tf.floor(start / scale), tf.int32), n_out - 1)
    boundary = tf.minimum(tf.cast(first + 1, tf.float32) * scale, start + 1.0)
    in_first = (boundary - start) / scale  # [n_in]: fraction of cell `first`
    in_second = (start + 1.0 - boundary) / scale  # and of the next cell (0 if none)
    second = tf.minimum(first + 1, n_out - 1)
    expand = [-1] + [1] * (len(x.shape) - 1)
    return (tf.math.unsorted_segment_sum(x * tf.reshape(in_first, expand), first, n_out)
            + tf.math.unsorted_segment_sum(x * tf.reshape(in_second, expand), second, n_out))


def _area_downsample(x, size):
    """[B, H, W, C] -> [B, h, w, C] area averages (h ≤ H, w ≤ W; see the axis helper)."""
    x = _area_downsample_axis0(tf.transpose(x, [1, 0, 2, 3]), size[0])  # [h, B, W, C]
    x = _area_downsample_axis0(tf.transpose(x, [2, 1, 0, 3]), size[1])  # [w, B, h, C]
    return tf.transpose(x, [1, 2, 0, 3])


@keras.saving.register_keras_serializable(package="popnet_tf")
class MaskedAveragePooling(keras.layers.Layer):
    """Class prototypes by masked average pooling of support features (Eq. 1, SPEC §6).

        p_c = (1 / |Λ_c|) Σ_{(x,y) ∈ Λ_c} h^s(x, y)

    Λ_c is the support mask of class c resized to the feature size h×w by nearest
    neighbour. A class present at full resolution whose pixels all vanish under the
    nearest resize (a thin strap, a class of a few pixels) falls back to area-weighted
    pooling: its one-hot mask at full resolution, area-averaged down to h×w, weights the
    features. So a class of the support is never silently lost. Background (c = 0) never
    forms a prototype (the paper predicts it by excluding the foreground), and labels
    outside 0..C-1 (`popnet_tf.classes.IGNORE_LABEL` = 255) belong to no class.

    Args:
        num_classes: int, C, the classes of the stage's label space (background included).
        **kwargs: passed to `keras.layers.Layer`. `dtype` defaults to "float32" rather
            than the global policy: the pooled sums must not be taken in float16.

    Call arguments:
        features: `[B, h, w, K]` support features, any float dtype.
        labels: `[B, H, W]` (or `[B, H, W, 1]`) integer support mask, 0..C-1, 255 ignore.

    Returns:
        `(prototypes [B, C, K] float32, presence [B, C] float32)`; an absent class has a
        zero prototype and presence 0; `presence[:, 0]` is always 0.

    Example:
        >>> pooling = MaskedAveragePooling(num_classes=5)
        >>> prototypes, presence = pooling(features, support_mask)  # [B,5,K], [B,5]
    """

    def __init__(self, num_classes, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_classes = num_classes

    def call(self, features, labels):
        # Cast at the top: under mixed precision the encoder hands over float16/bfloat16
        # features, and prototypes (sums over thousands of pixels) are kept in float32.
        features = tf.cast(features, tf.float32)  # [B, h, w, K]
        labels = tf.convert_to_tensor(labels)
        if labels.shape.rank == 4:
            labels = labels[..., 0]
        labels = tf.cast(labels, tf.int32)  # [B, H, W]
        size = tf.shape(features)[1:3]
        classes = tf.range(self.num_classes, dtype=tf.int32)  # [C]

        # Full-resolution membership; 255 (and anything outside 0..C-1) matches no class.
        full = tf.cast(tf.equal(labels[..., None], classes), tf.float32)  # [B, H, W, C]
        present = tf.reduce_max(full, axis=[1, 2])  # [B, C]

        # Eq. 1's mask at feature size: nearest neighbour, as the paper. The labels go
        # through the resize as float32 (exact for 0..255), the dtype every device and
        # XLA has a nearest-neighbour kernel for.
        small_labels = tf.image.resize(
            tf.cast(labels[..., None], tf.float32), size, method="nearest")[..., 0]
        small_labels = tf.cast(small_labels, tf.int32)  # [B, h, w]
        small = tf.cast(tf.equal(small_labels[..., None], classes), tf.float32)  # [B, h, w, C]
        # Area fallback for the classes the nearest resize dropped entirely.
        area = _area_downsample(full, size)  # [B, h, w, C]
        vanished = (present > 0) & (tf.reduce_sum(small, axis=[1, 2]) == 0)  # [B, C]
        weights = tf.where(vanished[:, None, None, :], area, small)  # [B, h, w, C]

        foreground = tf.cast(classes > 0, tf.float32)  # [C]: no background prototype
        weights = weights * foreground
        presence = present * foreground  # [B, C]
        sums = tf.einsum("bhwc,bhwk->bck", weights, features)  # [B, C, K]
        counts = tf.reduce_sum(weights, axis=[1, 2])  # [B, C]
        prototypes = tf.math.divide_no_nan(sums, counts[..., None])  # absent -> 0
        return prototypes, presence

    def compute_output_shape(self, features_shape, labels_shape):
        batch, dim = features_shape[0], features_shape[-1]
        return (batch, self.num_classes, dim), (batch, self.num_classes)

    def compute_output_spec(self, features, labels):
        # The outputs are float32 whatever the layer's dtype policy (see `call`).
        prototypes_shape, presence_shape = self.compute_output_shape(features.shape, labels.shape)
        return (keras.KerasTensor(prototypes_shape, dtype="float32"),
                keras.KerasTensor(presence_shape, dtype="float32"))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


@keras.saving.register_keras_serializable(package="popnet_tf")
class PrototypeStore(keras.layers.Layer):
    """Dynamic class prototypes kept by a slow moving average (Eq. 2 as SPEC §6 fixes it).

    In training, for every class c present in the batch, with p_c the mean of the batch's
    prototypes of c (the cross-replica mean under `tf.distribute`):

        first sighting (seen_c = 0):  p_d,c ← p_c
        afterwards:                   p_d,c ← (1 − α)·p_d,c + α·p_c,     seen_c ← 1

    Classes absent from the batch are left untouched. The returned prototypes blend the
    (updated) store with each sample's own static prototype,

        p̂_c = (1 − α)·stop_gradient(p_d,c) + α·p_c    where use_dynamic, seen_c and c is
                                                      present in that sample's support,
        p̂_c = p_c                                     otherwise.

    Outside training the store is read, never written: base classes were seen in training
    and use the blend; novel classes were never seen and keep their static prototypes.
    An absent class keeps its zero static prototype so its distance map stays 0.

    The store (`prototypes [C, K]`, `seen [C]`) is two non-trainable weights, saved in
    checkpoints and `.keras` files. Under a `tf.distribute` strategy every replica
    computes the same update from all-reduced sums, so the variables use
    `only_first_replica` aggregation.

    Args:
        num_classes: int, C, classes held (background included; it is never present).
        dim: int, K, the feature size.
        momentum: float, α, weight of the new batch prototype (SPEC §6: 0.001).
        **kwargs: passed to `keras.layers.Layer`; `dtype` defaults to "float32".

    Call arguments:
        prototypes: `[B, C, K]` static prototypes p_c (from `MaskedAveragePooling`).
        presence: `[B, C]` 1 where the support holds class c.
        training: Python bool; True updates the store.
        use_dynamic: Python bool or scalar bool tensor; False returns the static
            prototypes (the warm-up epochs of SPEC §6), the store is still updated.

    Returns:
        p̂ `[B, C, K]` float32.

    Example:
        >>> store = PrototypeStore(num_classes=12, dim=256)
        >>> p_hat = store(prototypes, presence, training=True, use_dynamic=True)
    """

    def __init__(self, num_classes, dim, momentum=0.001, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.dim = dim
        self.momentum = momentum

    def build(self, prototypes_shape=None, presence_shape=None):
        if prototypes_shape is not None and prototypes_shape[-1] not in (None, self.dim):
            raise ValueError(
                f"popnet_tf/layers/prototypes.py: PrototypeStore(dim={self.dim}) got prototypes "
                f"of shape {prototypes_shape}; build it with dim equal to the feature size.")
        # autocast=False: the store is read in float32 even inside a mixed-precision model.
        self.prototypes = self.add_weight(
            shape=(self.num_classes, self.dim), initializer="zeros", dtype="float32",
            trainable=False, autocast=False, aggregation="only_first_replica",
            name="prototypes")
        self.seen = self.add_weight(
            shape=(self.num_classes,), initializer="zeros", dtype="float32",
            trainable=False, autocast=False, aggregation="only_first_replica", name="seen")

    def call(self, prototypes, presence, training=False, use_dynamic=True):
        prototypes = tf.cast(prototypes, tf.float32)  # [B, C, K]
        presence = tf.cast(presence, tf.float32)  # [B, C]
        store = tf.convert_to_tensor(self.prototypes)  # [C, K]
        seen = tf.convert_to_tensor(self.seen)  # [C]
        alpha = tf.constant(self.momentum, tf.float32)

        if training:
            sums = tf.einsum("bc,bck->ck", presence, prototypes)  # [C, K]
            counts = tf.reduce_sum(presence, axis=0)  # [C]
            context = tf.distribute.get_replica_context()
            if context is not None and context.num_replicas_in_sync > 1:
                # The batch mean is over the global batch: every replica then makes the
                # same update, so the mirrored store stays in sync.
                sums, counts = context.all_reduce(
                    tf.distribute.ReduceOp.SUM, [sums, counts])
            batch_mean = tf.math.divide_no_nan(sums, counts[:, None])  # [C, K]
            in_batch = (counts > 0)[:, None]  # [C, 1]
            first = (seen == 0)[:, None]  # [C, 1]
            ema = (1.0 - alpha) * store + alpha * batch_mean
            store = tf.where(in_batch, tf.where(first, batch_mean, ema), store)
            seen = tf.where(counts > 0, tf.ones_like(seen), seen)
            self.prototypes.assign(store)
            self.seen.assign(seen)

        blend = (1.0 - alpha) * tf.stop_gradient(store)[None] + alpha * prototypes  # [B, C, K]
        dynamic = (tf.cast(use_dynamic, tf.bool)
                   & (seen > 0)[None, :]
                   & (presence > 0))  # [B, C]
        return tf.where(dynamic[..., None], blend, prototypes)

    def compute_output_shape(self, prototypes_shape, presence_shape):
        return tuple(prototypes_shape)

    def compute_output_spec(self, prototypes, presence, training=False, use_dynamic=True):
        return keras.KerasTensor(tuple(prototypes.shape), dtype="float32")

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "dim": self.dim,
                "momentum": self.momentum}


__all__ = ["MaskedAveragePooling", "PrototypeStore"]
