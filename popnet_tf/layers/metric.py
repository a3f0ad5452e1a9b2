"""Dual-metric learning: cosine distance maps, AGM (Eq. 3) and NCM (Eq. 4), SPEC §6.

Every class is a channel of a `[B, h, w, C]` tensor; which classes a support holds is
the presence mask `[B, C]`. Channel 0 is background: it has no prototype and its logit
is built from the foreground channels. Classes absent from the support get the logit
`MASKED_LOGIT`, so softmax gives them probability 0 and means run over present classes.
Distance maps and logits are float32 even under mixed precision (STYLE numerics).

Example:
    >>> maps = cosine_similarity(query_features, p_hat)            # [B, h, w, C]
    >>> ncm_logits = NearestCentroid()(maps, presence)              # [B, h, w, C]
    >>> agm_logits = AttentionGuidance(256)(query_features, maps, presence)
"""

from __future__ import annotations

import keras
import tensorflow as tf

from popnet_tf.layers.tracking import track_layers

# Logit of a class absent from the support: exp(-1e4 - max) underflows to exactly 0 in
# float32. Logits are cast to float32 before masking, so this is safe under float16
# (whose largest finite value is 65504).
MASKED_LOGIT = -1e4

# Norms are clamped at sqrt(_EPSILON) so a zero prototype (an absent class) gives a
# similarity of 0 and a finite gradient instead of 0/0.
_EPSILON = 1e-12


def cosine_similarity(features, prototypes):
    """Cosine similarity of every pixel with every class prototype (distance maps, SPEC §6).

        m_c(x, y) = <h(x, y), p_c> / (max(‖h(x, y)‖, ε) · max(‖p_c‖, ε))

    Computed in float32 whatever the input dtype. A zero prototype gives 0.

    Args:
        features: `[B, h, w, K]` query features h^q.
        prototypes: `[B, C, K]` prototypes p̂ (per sample).

    Returns:
        `[B, h, w, C]` float32 in [-1, 1].

    Example:
        >>> maps = cosine_similarity(tf.random.normal([2, 8, 8, 16]), tf.random.normal([2, 5, 16]))
        >>> maps.shape  # TensorShape([2, 8, 8, 5])
    """
    # float32 even under mixed precision: similarities feed a temperature-scaled softmax.
    features = tf.math.l2_normalize(tf.cast(features, tf.float32), axis=-1, epsilon=_EPSILON)
    prototypes = tf.math.l2_normalize(tf.cast(prototypes, tf.float32), axis=-1, epsilon=_EPSILON)
    return tf.einsum("bhwk,bck->bhwc", features, prototypes)


@keras.saving.register_keras_serializable(package="popnet_tf")
class CosineSimilarity(keras.layers.Layer):
    """Layer form of `cosine_similarity` for functional models (no weights).

    Call arguments: features `[B, h, w, K]`, prototypes `[B, C, K]`; returns `[B, h, w, C]`
    float32. `dtype` defaults to "float32" so the inputs are not autocast to float16.

    Example:
        >>> maps = CosineSimilarity()(query_features, prototypes)  # [B, h, w, C]
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, features, prototypes):
        return cosine_similarity(features, prototypes)

    def compute_output_shape(self, features_shape, prototypes_shape):
        return tuple(features_shape[:3]) + (prototypes_shape[1],)

    def compute_output_spec(self, features, prototypes):
        return keras.KerasTensor(self.compute_output_shape(features.shape, prototypes.shape),
                                 dtype="float32")


def _mask_absent(logits, presence):
    """Foreground logits `[B, h, w, C-1]` -> MASKED_LOGIT where presence `[B, C-1]` is 0."""
    return tf.where(presence[:, None, None, :] > 0, logits, tf.constant(MASKED_LOGIT, tf.float32))


@keras.saving.register_keras_serializable(package="popnet_tf")
class AttentionGuidance(keras.layers.Layer):
    """Attention Guidance Module, the parametric head of dual-metric learning (AGM, Eq. 3).

    Each distance map attends the query features in a residual way,

        r_c = m_c ⊙ h^q + h^q,

    and a shared trunk (`hidden_convs` × (k×k conv + ReLU), identity by default) feeds
    two 1×1 heads: φ gives the class logit and ω a background vote,

        logit_c  = φ(r_c)                                for present c ≥ 1,
        logit_bg = (1 / |C_s \\ bg|) Σ_{present c ≥ 1} ω(r_c),

    so a softmax over [bg, c …] is Eq. 3. Absent classes get `MASKED_LOGIT`. With no
    foreground class present the background logit is 0 (it is then the only class).

    With `hidden_convs = 0` φ and ω are affine, so φ(r_c) = (1 + m_c)·(W_φ h^q) + b_φ:
    one 1×1 product over h^q serves every class instead of building `[B, C, h, w, K]`
    (C times less memory; same weights, same result).

    With `hidden_convs > 0` two rewrites give the same result for less work
    (docs/PERFORMANCE.md has the measurements):
    - only the (sample, class) pairs present in the support go through the trunk,
      as one `[P, h, w, K]` batch; absent classes are masked anyway, so their
      logits and gradients were thrown away (8 of 11 classes in a stage-3 episode);
    - the first trunk conv is linear in r_c = s_c ⊙ h^q with s_c = 1 + m_c a
      per-pixel scalar, so with W_t its kernel tap at offset δ_t,
          conv(r_c)(x) = b + Σ_t s_c(x + δ_t) · (W_t h^q)(x + δ_t):
      the k² products W_t h^q are computed once for all classes (one conv's work)
      and each class only weighs and sums them (k² multiply-adds per value)
      instead of running its own k×k conv. The ReLU after it keeps the later
      trunk convs per class. The price is memory: the k² products
      `[B, h, w, k², K]` and the first conv of every class `[B, C-1, h, w, K]`,
      absent ones included, are held for the backward pass.

    Args:
        dim: int, K, the feature size (input and trunk width).
        hidden_convs: int, conv + ReLU layers of the shared trunk before φ and ω.
        kernel_size: int, kernel size of the trunk's convolutions.
        **kwargs: passed to `keras.layers.Layer` (the convolutions follow the dtype
            policy; the logits are cast to float32 before masking).

    Call arguments:
        features: `[B, h, w, K]` query features h^q.
        maps: `[B, h, w, C]` distance maps (channel 0, background, is not used).
        presence: `[B, C]` 1 where the support holds class c.

    Returns:
        logits `[B, h, w, C]` float32.

    Example:
        >>> agm = AttentionGuidance(dim=256)
        >>> logits = agm(query_features, maps, presence)  # [B, h, w, C]
    """

    def __init__(self, dim, hidden_convs=0, kernel_size=3, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.hidden_convs = hidden_convs
        self.kernel_size = kernel_size

    def build(self, features_shape=None, maps_shape=None, presence_shape=None):
        if features_shape is not None and features_shape[-1] not in (None, self.dim):
            raise ValueError(
                f"popnet_tf/layers/metric.py: AttentionGuidance(dim={self.dim}) got features "
                f"of shape {features_shape}; build it with dim equal to the feature size.")
        trunk_shape = (None, None, None, self.dim)
        trunk = []
        for i in range(self.hidden_convs):
            conv = keras.layers.Conv2D(self.dim, self.kernel_size, padding="same",
                                       activation="relu", dtype=self.dtype_policy,
                                       name=f"trunk_{i}")
            conv.build(trunk_shape)
            trunk.append(conv)
        self.trunk = track_layers(self, "trunk", trunk)  # visible to tf.train.Checkpoint
        self.phi = keras.layers.Conv2D(1, 1, dtype=self.dtype_policy, name="phi")
        self.omega = keras.layers.Conv2D(1, 1, dtype=self.dtype_policy, name="omega")
        self.phi.build(trunk_shape)
        self.omega.build(trunk_shape)

    def call(self, features, maps, presence):
        features = tf.cast(features, self.compute_dtype)  # [B, h, w, K]
        fg_maps = tf.cast(maps[..., 1:], self.compute_dtype)  # [B, h, w, C-1]
        presence = tf.cast(presence[:, 1:], tf.float32)  # [B, C-1]

        if self.hidden_convs == 0:
            # φ, ω affine: φ(m·h + h) = (1 + m)·(W h) + b; W h is computed once, [B, h, w, 1].
            scale = 1.0 + fg_maps  # [B, h, w, C-1]

            def affine(head):  # [B, h, w, C-1]
                kernel = tf.cast(tf.reshape(head.kernel, [self.dim, 1]), self.compute_dtype)
                bias = tf.cast(head.bias, self.compute_dtype)
                return scale * tf.matmul(features, kernel) + bias  # W h: [B, h, w, 1]

            phi, omega = affine(self.phi), affine(self.omega)
        else:
            phi, omega = self._trunk_logits(features, fg_maps, presence)

        # float32 before masking and averaging (MASKED_LOGIT overflows nothing there).
        phi = tf.cast(phi, tf.float32)
        omega = tf.cast(omega, tf.float32)
        num_present = tf.reduce_sum(presence, axis=-1)[:, None, None]  # [B, 1, 1]
        background = tf.math.divide_no_nan(
            tf.reduce_sum(omega * presence[:, None, None, :], axis=-1), num_present)  # [B, h, w]
        return tf.concat([background[..., None], _mask_absent(phi, presence)], axis=-1)

    def _first_conv(self, features, fg_maps):
        """The first trunk conv of every r_c, pre-activation: `[B, C-1, h, w, K]`.

        conv(s_c ⊙ h)(x) = b + Σ_t s_c(x + δ_t) · (W_t h)(x + δ_t), s_c = 1 + m_c,
        both zero outside the map as in the conv's "same" padding. The taps'
        products V_t(x) = W_t h(x + δ_t) are k² matmuls shared by all classes;
        the per-class part is a [T]·[T, K] product per pixel.
        """
        k, dim = self.kernel_size, self.dim
        # Conv2D's "same" padding: (k - 1) // 2 before, the rest after (even k too).
        before = (k - 1) // 2
        pads = [[0, 0], [before, k - 1 - before], [before, k - 1 - before], [0, 0]]
        shape = tf.shape(features)
        batch, height, width = shape[0], shape[1], shape[2]
        conv = self.trunk[0]
        kernel = tf.cast(conv.kernel, self.compute_dtype)  # [k, k, K, K]
        padded = tf.pad(features, pads)
        scale = tf.pad(1.0 + fg_maps, pads)
        taps_v, taps_s = [], []
        for dy in range(k):  # k² kernel taps (static), not classes
            for dx in range(k):
                window = tf.reshape(padded[:, dy:dy + height, dx:dx + width, :], [-1, dim])
                taps_v.append(tf.reshape(tf.matmul(window, kernel[dy, dx]),
                                         [batch, height, width, dim]))  # V_t [B, h, w, K]
                taps_s.append(scale[:, dy:dy + height, dx:dx + width, :])  # [B, h, w, C-1]
        v = tf.stack(taps_v, axis=3)  # [B, h, w, T, K]
        s = tf.stack(taps_s, axis=4)  # [B, h, w, C-1, T]
        # A batched matmul rather than tf.einsum: the graph's FLOP count (bench) knows it.
        out = tf.transpose(tf.matmul(s, v), [0, 3, 1, 2, 4])  # [B, C-1, h, w, K]
        return out + tf.cast(conv.bias, self.compute_dtype)

    def _trunk_logits(self, features, fg_maps, presence):
        """φ(r_c), ω(r_c) `[B, h, w, C-1]` through the trunk, for present classes only
        (absent ones 0: they are masked by the caller)."""
        shape = tf.shape(fg_maps)
        batch, height, width, num_fg = shape[0], shape[1], shape[2], shape[3]
        pairs = tf.cast(tf.where(presence > 0), tf.int32)  # [P, 2] (sample, class)
        x = tf.nn.relu(tf.gather_nd(self._first_conv(features, fg_maps), pairs))  # [P, h, w, K]
        for conv in self.trunk[1:]:
            x = conv(x)

        def scatter(head):  # [P, h, w, 1] -> [B, h, w, C-1], zero where absent
            y = tf.scatter_nd(pairs, head(x)[..., 0], tf.stack([batch, num_fg, height, width]))
            return tf.transpose(y, [0, 2, 3, 1])

        return scatter(self.phi), scatter(self.omega)

    def compute_output_shape(self, features_shape, maps_shape, presence_shape):
        return tuple(maps_shape)

    def compute_output_spec(self, features, maps, presence):
        return keras.KerasTensor(tuple(maps.shape), dtype="float32")

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "hidden_convs": self.hidden_convs,
                "kernel_size": self.kernel_size}


@keras.saving.register_keras_serializable(package="popnet_tf")
class NearestCentroid(keras.layers.Layer):
    """Nearest Centroid Module, the non-parametric head of dual-metric learning (NCM, Eq. 4).

        logits = τ · [m_bg, m_1, …, m_{C−1}],
        m_bg   = (1 / |C_s \\ bg|) Σ_{present c ≥ 1} (1 − m_c),

    τ a learnable temperature (initialised at 10 as in the authors' code), so a softmax
    over the logits is Eq. 4 with a temperature. Absent classes get `MASKED_LOGIT`. With
    no foreground class present, m_bg = 1 (only background remains): logit_bg = τ.

    Args:
        initial_temperature: float, initial τ.
        **kwargs: passed to `keras.layers.Layer`; `dtype` defaults to "float32".

    Call arguments:
        maps: `[B, h, w, C]` distance maps (channel 0 is not used).
        presence: `[B, C]` 1 where the support holds class c.

    Returns:
        logits `[B, h, w, C]` float32.

    Example:
        >>> ncm = NearestCentroid(initial_temperature=10.0)
        >>> logits = ncm(maps, presence)  # [B, h, w, C]
    """

    def __init__(self, initial_temperature=10.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.initial_temperature = initial_temperature

    def build(self, maps_shape=None, presence_shape=None):
        # autocast=False: τ is read in float32 under a mixed-precision policy too.
        self.temperature = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(self.initial_temperature),
            dtype="float32", trainable=True, autocast=False, name="temperature")

    def call(self, maps, presence):
        fg_maps = tf.cast(maps[..., 1:], tf.float32)  # [B, h, w, C-1]
        presence = tf.cast(presence[:, 1:], tf.float32)  # [B, C-1]
        num_present = tf.reduce_sum(presence, axis=-1)[:, None, None]  # [B, 1, 1]
        reverse = tf.reduce_sum((1.0 - fg_maps) * presence[:, None, None, :], axis=-1)
        background = tf.where(num_present > 0,
                              tf.math.divide_no_nan(reverse, num_present), 1.0)  # [B, h, w]
        temperature = tf.convert_to_tensor(self.temperature)
        logits = temperature * tf.concat([background[..., None], fg_maps], axis=-1)
        return tf.concat([logits[..., :1], _mask_absent(logits[..., 1:], presence)], axis=-1)

    def compute_output_shape(self, maps_shape, presence_shape):
        return tuple(maps_shape)

    def compute_output_spec(self, maps, presence):
        return keras.KerasTensor(tuple(maps.shape), dtype="float32")

    def get_config(self):
        return {**super().get_config(), "initial_temperature": self.initial_temperature}


__all__ = ["MASKED_LOGIT", "AttentionGuidance", "CosineSimilarity", "NearestCentroid",
           "cosine_similarity"]
