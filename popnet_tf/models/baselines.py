"""The paper's baselines (Experiments, Baselines) as one-shot stage models.

Same encoder (`DeepLabV3PlusEncoder`), same data, same training loop and the same
evaluation as POPNet; only the way a support turns into a prediction differs. Each
model has the interface of `stages.OneShotStage` that `train_lib` and `eval_lib` use:

- `call(inputs, training, use_dynamic)` -> dict with "logits" (the method's own),
  "agm_logits" = "ncm_logits" = "logits" (so Eq. 5 reduces to plain cross-entropy
  whatever β is), "probs", and optionally "extra_loss" [B] (PANet's alignment loss);
- `infused_features(image)`, `support_prototypes(image, mask)` -> (per-support
  state [B, C, D], presence [B, C]), `store` (identity: no dynamic prototypes) and
  `heads(features, state, presence, query_image)`, so `eval_lib.evaluate_kway`
  encodes each support and each query once, as for POPNet (head "model").

Baselines are single-stage: no KIM, no dynamic prototypes (SPEC §6 ablation rows
before "+KIM").

- `SGOneStage` — SG-One (Zhang et al. 2018): similarity guidance. K-way prediction is
  Eq. 3 without the residual: r_c = m_c ⊙ h^q, logit_c = φ(r_c), background =
  mean_c ω(r_c) (`SimilarityGuidance`).
- `PANetStage` — PANet (Wang et al. 2019): non-parametric prototypes, background
  included, logits = scale·cos; k-way by k binary supports (class c vs the rest of
  the support, so the background prototype is the mean over the k ways of the
  support's pixels not of class c); prototype alignment loss (`panet_alignment_loss`).
- `AMPStage` — AMP (Siam et al. 2019): a cosine classifier at two resolutions of the
  encoder (decoder output g, stride 4, and ASPP output, stride 16) whose class
  weights are adapted by imprinting the support's normalised masked proxies
  (`MaskedProxyImprinting`).
- `FineTuneStage` — Fine-tune (Caelles et al. 2017): an ordinary segmentation net
  (encoder + 1×1 classifier) trained on D_train; at test `finetune_variables()` (the
  last two decoder convs and the classifier) are tuned on the support for a few
  steps (`popnet_tf.eval_lib.finetune_*`). Without that step it predicts with the
  D_train classifier restricted to the support's classes.

Example:
    >>> from configs.baselines import panet
    >>> from popnet_tf.models import popnet
    >>> config = panet.get_config("smoke")
    >>> model = build_baseline(config, 3, popnet.encoder_kwargs(config))
    >>> out = model({"query_image": q, "support_image": s, "support_mask": m}, training=True)
    >>> out["logits"].shape, out["extra_loss"].shape   # [B, H, W, 12], [B]
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from popnet_tf import classes
from popnet_tf.layers.metric import MASKED_LOGIT, AttentionGuidance, cosine_similarity
from popnet_tf.layers.prototypes import MaskedAveragePooling
from popnet_tf.models.encoder import DeepLabV3PlusEncoder

METHODS = ("sgone", "panet", "amp", "finetune")
# How tables and logs name each `config.model.method` (the paper's spelling).
METHOD_TITLES = {"popnet": "POPNet", "sgone": "SG-One", "panet": "PANet", "amp": "AMP",
                 "finetune": "Fine-tune"}

# l2 normalisation floor (as layers.metric): a zero vector stays zero, gradients finite.
_EPSILON = 1e-12


def _resize(logits, like_image):
    """Bilinear resize of [B, h, w, C] float32 logits to an image's spatial size."""
    return ops.image.resize(ops.cast(logits, "float32"), ops.shape(like_image)[1:3],
                            interpolation="bilinear")


def _mask_absent(logits, presence):
    """[B, h, w, C] logits -> MASKED_LOGIT on foreground classes absent from the
    support (presence [B, C]); background (channel 0) always competes."""
    keep = tf.concat([tf.ones_like(presence[:, :1]), presence[:, 1:]], axis=-1) > 0  # [B, C]
    return tf.where(keep[:, None, None, :], logits, tf.constant(MASKED_LOGIT, tf.float32))


def _one_hot_small(labels, size, num_classes):
    """[B, H, W] labels -> [B, h, w, C] float32 one-hot at feature size (nearest, as
    Eq. 1); 255 and other out-of-range labels match no class."""
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank == 4:
        labels = labels[..., 0]
    small = tf.image.resize(tf.cast(labels[..., None], tf.float32), size, method="nearest")
    small = tf.cast(small[..., 0], tf.int32)  # [B, h, w]
    return tf.cast(tf.equal(small[..., None], tf.range(num_classes)), tf.float32)


@keras.saving.register_keras_serializable(package="popnet_tf")
class IdentityStore(keras.layers.Layer):
    """The `store` of a model without dynamic prototypes: returns its input, so
    `eval_lib` can treat every stage model alike. No weights."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # Nothing to build. Built from the start: the baselines' call never uses it,
        # and Keras warns about a model holding an unbuilt layer.
        self.built = True

    def call(self, prototypes, presence, training=False, use_dynamic=True):
        del presence, training, use_dynamic
        return tf.convert_to_tensor(prototypes)


class _BaselineStage(keras.Model):
    """Encoder, identity store and the shared call; subclasses define
    `support_prototypes` and `heads`."""

    method = ""

    def __init__(self, num_classes: int, encoder: dict, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.encoder_config = dict(encoder)
        self.filters = self.encoder_config.get("filters", 256)
        self.encoder = DeepLabV3PlusEncoder(**self.encoder_config, name="encoder")
        self.store = IdentityStore(name="store")

    def infused_features(self, image, training=False):
        """No KIM: the stage's own encoder features g [B, h, w, K]."""
        return self.encoder(image, training=training)

    def call(self, inputs, training=False, use_dynamic=True):
        del use_dynamic  # no dynamic prototypes
        state, presence = self.support_prototypes(
            inputs["support_image"], inputs["support_mask"], training=training)
        query_features = self.infused_features(inputs["query_image"], training=training)
        return self.heads(query_features, state, presence, inputs["query_image"])

    def _outputs(self, feature_logits, query_image, **extra) -> dict:
        """The output dict from [B, h, w, C] float32 logits at feature resolution."""
        logits = _resize(feature_logits, query_image)
        probs = ops.softmax(logits, axis=-1)
        # The loss of train_lib is Eq. 5 on (agm, ncm): the same logits in both make
        # it plain cross-entropy whatever β is.
        return {"logits": logits, "agm_logits": logits, "ncm_logits": logits,
                "probs": probs, **extra}

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "encoder": self.encoder_config}


# ----------------------------------------------------------------------------- SG-One
@keras.saving.register_keras_serializable(package="popnet_tf")
class SimilarityGuidance(AttentionGuidance):
    """SG-One's similarity guidance as a k-way head: Eq. 3 without the residual.

        r_c = m_c ⊙ h^q,   logit_c = φ(r_c),   logit_bg = mean_{present c} ω(r_c)

    Same trunk (`hidden_convs`), φ, ω and masking as `AttentionGuidance`, whose
    weights and config it shares; only r_c differs.

    Call: features [B, h, w, K], maps [B, h, w, C], presence [B, C] -> logits
    [B, h, w, C] float32.

    Example:
        >>> logits = SimilarityGuidance(64)(features, maps, presence)
    """

    def call(self, features, maps, presence):
        features = tf.cast(features, self.compute_dtype)  # [B, h, w, K]
        fg_maps = tf.cast(maps[..., 1:], self.compute_dtype)  # [B, h, w, C-1]
        fg_presence = tf.cast(presence[:, 1:], tf.float32)  # [B, C-1]
        if self.hidden_convs == 0:
            # φ affine: φ(m·h) = m·(W h) + b; W h computed once, [B, h, w, 1].
            def affine(head):
                kernel = tf.cast(tf.reshape(head.kernel, [self.dim, 1]), self.compute_dtype)
                return fg_maps * tf.matmul(features, kernel) + tf.cast(head.bias, self.compute_dtype)

            phi, omega = affine(self.phi), affine(self.omega)
        else:
            shape = tf.shape(fg_maps)
            batch, height, width, num_fg = shape[0], shape[1], shape[2], shape[3]
            guided = fg_maps[..., None] * features[:, :, :, None, :]  # [B, h, w, C-1, K]
            x = tf.reshape(tf.transpose(guided, [0, 3, 1, 2, 4]),
                           [batch * num_fg, height, width, self.dim])
            for conv in self.trunk:
                x = conv(x)

            def per_class(head):  # [B·(C-1), h, w, 1] -> [B, h, w, C-1]
                y = tf.reshape(head(x), [batch, num_fg, height, width])
                return tf.transpose(y, [0, 2, 3, 1])

            phi, omega = per_class(self.phi), per_class(self.omega)
        phi, omega = tf.cast(phi, tf.float32), tf.cast(omega, tf.float32)
        num_present = tf.reduce_sum(fg_presence, axis=-1)[:, None, None]  # [B, 1, 1]
        background = tf.math.divide_no_nan(
            tf.reduce_sum(omega * fg_presence[:, None, None, :], axis=-1), num_present)
        logits = tf.concat([background[..., None], phi], axis=-1)  # [B, h, w, C]
        return _mask_absent(logits, tf.cast(presence, tf.float32))


@keras.saving.register_keras_serializable(package="popnet_tf")
class SGOneStage(_BaselineStage):
    """SG-One baseline (see the module docstring).

    Args:
        num_classes: classes of the stage's label space, background included.
        encoder: `DeepLabV3PlusEncoder` arguments.
        hidden_convs: 3x3 conv + ReLU layers after the guidance (as POPNet's AGM trunk).
    Call: as `stages.OneShotStage`; outputs "logits", "probs" [B, H, W, C] and the
        intermediates "prototypes", "presence", "distance_maps", "features".

    Example:
        >>> out = SGOneStage(12, {"backbone": "small", "filters": 16})(batch)
    """

    method = "sgone"

    def __init__(self, num_classes: int, encoder: dict, hidden_convs: int = 0, **kwargs):
        super().__init__(num_classes, encoder, **kwargs)
        self.hidden_convs = hidden_convs
        self.pooling = MaskedAveragePooling(num_classes, name="masked_average_pooling")
        self.guidance = SimilarityGuidance(self.filters, hidden_convs=hidden_convs, name="guidance")

    def support_prototypes(self, support_image, support_mask, training=False):
        """Eq. 1 prototypes [B, C, K] and presence [B, C] (as POPNet's static ones)."""
        return self.pooling(self.infused_features(support_image, training=training), support_mask)

    def heads(self, query_features, prototypes, presence, query_image, compute_agm=True):
        del compute_agm
        maps = cosine_similarity(query_features, prototypes)  # [B, h, w, C]
        logits = self.guidance(query_features, maps, presence)
        return self._outputs(logits, query_image, distance_maps=maps, presence=presence,
                             prototypes=prototypes, features=query_features)

    def get_config(self):
        return {**super().get_config(), "hidden_convs": self.hidden_convs}


# ----------------------------------------------------------------------------- PANet
def panet_background_prototype(features, labels, presence, num_classes):
    """PANet's background prototype for a k-way support split into k binary supports.

    Way c's support mask is "class c" vs "every other labelled pixel", so its
    background prototype is the mean feature of the labelled pixels not of class c;
    PANet averages the background over the ways:

        bg = mean_{present c ≥ 1} [ (S − s_c) / (N − n_c) ]

    with S, N the feature sum and count over labelled pixels (label ≠ 255) and s_c,
    n_c over the pixels of class c, all at feature size (mask resized by nearest
    neighbour, as Eq. 1). With no foreground class present: S / N.

    Args:
        features: [B, h, w, K]; labels: [B, H, W] int (255 ignore); presence: [B, C]
            (1 where class c ≥ 1 is in the support); num_classes: C.
    Returns:
        [B, K] float32.
    """
    features = tf.cast(features, tf.float32)
    one_hot = _one_hot_small(labels, tf.shape(features)[1:3], num_classes)  # [B, h, w, C]
    valid = tf.reduce_sum(one_hot, axis=-1)  # [B, h, w]: 0 on 255 / padding
    total = tf.einsum("bhw,bhwk->bk", valid, features)  # S [B, K]
    count = tf.reduce_sum(valid, axis=[1, 2])  # N [B]
    class_sums = tf.einsum("bhwc,bhwk->bck", one_hot, features)  # s_c [B, C, K]
    class_counts = tf.reduce_sum(one_hot, axis=[1, 2])  # n_c [B, C]
    per_way = tf.math.divide_no_nan(total[:, None, :] - class_sums,
                                    (count[:, None] - class_counts)[..., None])  # [B, C, K]
    fg = tf.cast(presence, tf.float32) * tf.cast(tf.range(num_classes) > 0, tf.float32)  # [B, C]
    num_ways = tf.reduce_sum(fg, axis=-1, keepdims=True)  # [B, 1]
    mean_ways = tf.math.divide_no_nan(tf.einsum("bc,bck->bk", fg, per_way), num_ways)
    everything = tf.math.divide_no_nan(total, count[:, None])
    return tf.where(num_ways > 0, mean_ways, everything)


def panet_logits(features, prototypes, presence, scale):
    """scale · cos(h, p_j) for j = background (row 0 of `prototypes`) and the present
    classes; absent classes masked. [B, h, w, K], [B, C, K], [B, C] -> [B, h, w, C]."""
    maps = cosine_similarity(features, prototypes)
    return _mask_absent(scale * maps, tf.cast(presence, tf.float32)), maps


def panet_alignment_loss(query_features, query_logits, support_features, support_labels,
                         presence, scale):
    """PANet's prototype alignment regularisation (PAR), per sample.

    The query's prediction (argmax of `query_logits` at feature size) gives query
    prototypes: q_0 from pixels predicted background, q_c from pixels predicted c
    (mean with PANet's +1e-5 in the count). For every way c present in the support
    and predicted somewhere in the query, the support is segmented into {q_0, q_c}
    by scale·cos, upsampled to the mask's size, and scored by cross-entropy against
    the support's binary mask (1 on class c, 0 on every other labelled pixel, 255
    ignored). Ways are summed and divided by the number of ways in the support
    (skipped ways count in the divisor, as PANet's code).

    Args:
        query_features [B, h, w, K], query_logits [B, h, w, C] (feature size),
        support_features [B, h', w', K], support_labels [B, H, W] int,
        presence [B, C], scale: float.
    Returns:
        [B] float32.
    """
    query_features = tf.cast(query_features, tf.float32)
    num_classes = query_logits.shape[-1]
    predicted = tf.one_hot(tf.argmax(query_logits, axis=-1), num_classes)  # [B, h, w, C]
    counts = tf.reduce_sum(predicted, axis=[1, 2])  # [B, C]
    query_prototypes = (tf.einsum("bhwc,bhwk->bck", predicted, query_features)
                        / (counts[..., None] + 1e-5))  # [B, C, K]
    maps = cosine_similarity(support_features, query_prototypes)  # [B, h', w', C]
    # Binary logits of way c: [bg, fg] = scale·[m_0, m_c]; the CE needs only fg − bg.
    margin = scale * (maps[..., 1:] - maps[..., :1])  # [B, h', w', C-1]
    labels = tf.cast(support_labels, tf.int32)
    margin = _resize(margin, labels[..., None])  # [B, H, W, C-1]
    target = tf.cast(tf.equal(labels[..., None], tf.range(1, num_classes)), tf.float32)
    valid = tf.cast(tf.not_equal(labels, classes.IGNORE_LABEL), tf.float32)[..., None]
    # CE of a 2-way softmax: softplus(−margin) for target 1, softplus(margin) for 0.
    per_pixel = target * tf.nn.softplus(-margin) + (1.0 - target) * tf.nn.softplus(margin)
    per_way = (tf.reduce_sum(per_pixel * valid, axis=[1, 2])
               / tf.maximum(tf.reduce_sum(valid, axis=[1, 2]), 1.0))  # [B, C-1]
    ways = tf.cast(presence, tf.float32)[:, 1:]  # [B, C-1]
    used = ways * tf.cast(counts[:, 1:] > 0, tf.float32)
    return tf.reduce_sum(per_way * used, axis=-1) / tf.maximum(tf.reduce_sum(ways, axis=-1), 1.0)


@keras.saving.register_keras_serializable(package="popnet_tf")
class PANetStage(_BaselineStage):
    """PANet baseline (see the module docstring).

    Args:
        num_classes, encoder: as `SGOneStage`.
        scale: α of PANet's scaled cosine (20 in the PANet paper).
        align_weight: λ of the alignment loss (PANet: 1).
    Call: as `stages.OneShotStage`; in training also "extra_loss" [B] = λ·PAR,
        which `train_lib` adds to the loss. The prototypes carry the background
        prototype in row 0.

    Example:
        >>> out = PANetStage(12, {"backbone": "small", "filters": 16})(batch, training=True)
    """

    method = "panet"

    def __init__(self, num_classes: int, encoder: dict, scale: float = 20.0,
                 align_weight: float = 1.0, **kwargs):
        super().__init__(num_classes, encoder, **kwargs)
        self.scale = scale
        self.align_weight = align_weight
        self.pooling = MaskedAveragePooling(num_classes, name="masked_average_pooling")

    def _prototypes(self, features, support_mask):
        foreground, presence = self.pooling(features, support_mask)  # [B, C, K], [B, C]
        background = panet_background_prototype(features, support_mask, presence, self.num_classes)
        prototypes = tf.concat([background[:, None, :], foreground[:, 1:]], axis=1)
        return prototypes, presence

    def support_prototypes(self, support_image, support_mask, training=False):
        """[B, C, K] prototypes (row 0: the k-way background) and presence [B, C]."""
        return self._prototypes(self.infused_features(support_image, training=training), support_mask)

    def heads(self, query_features, prototypes, presence, query_image, compute_agm=True):
        del compute_agm
        logits, maps = panet_logits(query_features, prototypes, presence, self.scale)
        return self._outputs(logits, query_image, distance_maps=maps, presence=presence,
                             prototypes=prototypes, features=query_features,
                             small_logits=logits)

    def call(self, inputs, training=False, use_dynamic=True):
        del use_dynamic
        support_features = self.infused_features(inputs["support_image"], training=training)
        prototypes, presence = self._prototypes(support_features, inputs["support_mask"])
        query_features = self.infused_features(inputs["query_image"], training=training)
        out = self.heads(query_features, prototypes, presence, inputs["query_image"])
        if training and self.align_weight:
            out["extra_loss"] = self.align_weight * panet_alignment_loss(
                query_features, out["small_logits"], support_features, inputs["support_mask"],
                presence, self.scale)
        return out

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "align_weight": self.align_weight}


# ----------------------------------------------------------------------------- AMP
def encoder_pyramid(encoder: DeepLabV3PlusEncoder, images, training=False):
    """(g [B, h4, w4, K], ASPP output [B, h16, w16, A]) of a DeepLab v3+ encoder.

    The same computation as `DeepLabV3PlusEncoder.call` (tests check g against it),
    keeping the stride-16 ASPP output for AMP's second resolution.
    """
    if not encoder.built:
        encoder.build(tuple(images.shape))
    x = ops.cast(images, encoder.compute_dtype) / 127.5 - 1.0
    pyramid = encoder.backbone(x, training=training)
    low, high = pyramid["low"], pyramid["high"]
    coarse = encoder.aspp(high, training=training)  # [B, h16, w16, A]
    x = ops.cast(ops.image.resize(coarse, ops.shape(low)[1:3], interpolation="bilinear"), low.dtype)
    x = ops.concatenate([x, encoder.low_level_projection(low, training=training)], axis=-1)
    for conv in encoder.decoder:
        x = conv(x, training=training)
    return x, coarse


def _l2_normalize(x):
    return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=-1, epsilon=_EPSILON)


@keras.saving.register_keras_serializable(package="popnet_tf")
class MaskedProxyImprinting(keras.layers.Layer):
    """AMP's cosine classifier with adaptive, multi-resolution weight imprinting.

    One weight matrix W_r [C, D_r] per resolution r. Given a support's masked
    proxies P_r [B, C, D_r] (mean features of each class, background included) and
    presence [B, C], the weights used for that support are

        w'_c = normalise((1 − α)·ŵ_c + α·p̂_c)   c present and seen in training,
        w'_c = p̂_c                               c present, never seen (novel: imprint),
        w'_c = ŵ_c                               c absent (its logit is masked anyway),

    with ŵ, p̂ the l2-normalised weights and proxies. `seen` [C] (non-trainable)
    records the classes present in a training support. Logits sum the resolutions:

        logit_c = τ · Σ_r cos(f_r, w'_{r,c}),    τ learnable (initial 10).

    Args:
        num_classes: C; dims: tuple of D_r; alpha: adaptation rate α;
        initial_temperature: τ at initialisation.

    Example:
        >>> amp = MaskedProxyImprinting(12, dims=(16, 16), alpha=0.25)
        >>> weights = amp.imprint(proxies, presence, training=False)   # [B, C, 32]
        >>> logits = amp.logits(features, weights, presence)           # [B, h, w, C]
    """

    def __init__(self, num_classes, dims, alpha=0.25, initial_temperature=10.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.dims = tuple(int(d) for d in dims)
        self.alpha = alpha
        self.initial_temperature = initial_temperature

    def build(self, *args, **kwargs):
        self.class_weights = []
        for r, d in enumerate(self.dims):
            # autocast=False: imprinting and cosines are float32 maths also inside a
            # mixed-precision model (read as bfloat16 they would not mix with the proxies).
            weights = self.add_weight(shape=(self.num_classes, d), initializer="glorot_uniform",
                                      dtype="float32", autocast=False, name=f"weights_{r}")
            setattr(self, f"weights_{r}", weights)  # an attribute each: seen by tf.train.Checkpoint
            self.class_weights.append(weights)
        self.seen = self.add_weight(shape=(self.num_classes,), initializer="zeros",
                                    dtype="float32", trainable=False, autocast=False, name="seen")
        self.temperature = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(self.initial_temperature),
            dtype="float32", autocast=False, name="temperature")

    def call(self, features, proxies, presence, training=False):
        return self.logits(features, self.imprint(proxies, presence, training=training), presence)

    def imprint(self, proxies, presence, training=False):
        """[B, C, ΣD] proxies, [B, C] presence (background included) -> [B, C, ΣD]
        weights; in training, marks the present classes as seen (after use)."""
        if not self.built:
            self.build()
        presence = tf.cast(presence, tf.float32)
        seen = tf.convert_to_tensor(self.seen)
        present = (presence > 0)[..., None]  # [B, C, 1]
        adapt = (seen > 0)[None, :, None]  # [1, C, 1]
        parts = tf.split(tf.cast(proxies, tf.float32), self.dims, axis=-1)
        out = []
        for weights, proxy in zip(self.class_weights, parts):  # resolutions: 2, not classes
            w_hat = _l2_normalize(weights)[None]  # [1, C, D]
            p_hat = _l2_normalize(proxy)  # [B, C, D]
            blended = _l2_normalize((1.0 - self.alpha) * w_hat + self.alpha * p_hat)
            imprinted = tf.where(adapt, blended, p_hat)
            out.append(tf.where(present, imprinted, w_hat + tf.zeros_like(p_hat)))
        if training:
            self.seen.assign(tf.maximum(seen, tf.reduce_max(presence, axis=0)))
        return tf.concat(out, axis=-1)

    def logits(self, features, weights, presence):
        """[B, h, w, ΣD] features, [B, C, ΣD] weights -> [B, h, w, C] float32."""
        feature_parts = tf.split(tf.cast(features, tf.float32), self.dims, axis=-1)
        weight_parts = tf.split(weights, self.dims, axis=-1)
        total = tf.add_n([cosine_similarity(f, w) for f, w in zip(feature_parts, weight_parts)])
        return _mask_absent(tf.convert_to_tensor(self.temperature) * total, presence)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "dims": self.dims,
                "alpha": self.alpha, "initial_temperature": self.initial_temperature}


@keras.saving.register_keras_serializable(package="popnet_tf")
class AMPStage(_BaselineStage):
    """AMP baseline (see the module docstring and `MaskedProxyImprinting`).

    Features are [g ; upsampled ASPP output] ([B, h4, w4, K + A]): the two
    resolutions of the cosine classifier. Proxies are masked averages of them over
    each class of the support, background (label 0) included.

    Args:
        num_classes, encoder: as `SGOneStage`; alpha: imprinting rate α;
        initial_temperature: τ at initialisation.

    Example:
        >>> out = AMPStage(12, {"backbone": "small", "filters": 16, "aspp_filters": 16})(batch)
    """

    method = "amp"

    def __init__(self, num_classes: int, encoder: dict, alpha: float = 0.25,
                 initial_temperature: float = 10.0, **kwargs):
        super().__init__(num_classes, encoder, **kwargs)
        self.alpha = alpha
        self.initial_temperature = initial_temperature
        dims = (self.filters, self.encoder_config.get("aspp_filters", 256))
        self.pooling = MaskedAveragePooling(num_classes, name="masked_average_pooling")
        self.classifier = MaskedProxyImprinting(num_classes, dims, alpha=alpha,
                                                initial_temperature=initial_temperature,
                                                name="imprinting")

    def infused_features(self, image, training=False):
        fine, coarse = encoder_pyramid(self.encoder, image, training=training)
        coarse = ops.image.resize(ops.cast(coarse, "float32"), ops.shape(fine)[1:3],
                                  interpolation="bilinear")
        return ops.concatenate([ops.cast(fine, "float32"), coarse], axis=-1)  # [B, h4, w4, K+A]

    def _proxies(self, features, support_mask):
        """Masked proxies [B, C, K+A] (background in row 0) and presence [B, C]
        (background: 1 where the support has label-0 pixels at feature size)."""
        foreground, presence = self.pooling(features, support_mask)  # [B, C, D], [B, C]
        background = _one_hot_small(support_mask, tf.shape(features)[1:3], self.num_classes)[..., 0]
        count = tf.reduce_sum(background, axis=[1, 2])  # [B]
        bg_proxy = tf.math.divide_no_nan(
            tf.einsum("bhw,bhwd->bd", background, tf.cast(features, tf.float32)), count[:, None])
        proxies = tf.concat([bg_proxy[:, None], foreground[:, 1:]], axis=1)
        presence = tf.concat([tf.cast(count > 0, tf.float32)[:, None], presence[:, 1:]], axis=1)
        return proxies, presence

    def support_prototypes(self, support_image, support_mask, training=False):
        """The support's imprinted classifier weights [B, C, K+A] and presence [B, C]."""
        features = self.infused_features(support_image, training=training)
        proxies, presence = self._proxies(features, support_mask)
        return self.classifier.imprint(proxies, presence, training=training), presence

    def heads(self, query_features, prototypes, presence, query_image, compute_agm=True):
        del compute_agm
        logits = self.classifier.logits(query_features, prototypes, presence)
        return self._outputs(logits, query_image, presence=presence, prototypes=prototypes,
                             features=query_features)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha,
                "initial_temperature": self.initial_temperature}


# ----------------------------------------------------------------------------- Fine-tune
def support_presence(support_mask, num_classes):
    """[B, H, W] labels -> [B, C] float32, 1 where foreground class c ≥ 1 occurs."""
    mask = tf.cast(support_mask, tf.int32)
    hits = tf.cast(tf.equal(mask[..., None], tf.range(num_classes)), tf.float32)
    return tf.reduce_max(hits, axis=[1, 2]) * tf.cast(tf.range(num_classes) > 0, tf.float32)


@keras.saving.register_keras_serializable(package="popnet_tf")
class FineTuneStage(_BaselineStage):
    """Fine-tune baseline: encoder + 1×1 classifier over all C classes, logits of
    classes absent from the support masked (the support defines the class set).

    `finetune_variables()` are what the test-time fine-tuning changes: the last two
    conv layers of the decoder (fewer if `decoder_convs` < 2) and the classifier.

    Example:
        >>> model = FineTuneStage(12, {"backbone": "small", "filters": 16})
        >>> out = model(batch)                     # D_train classifier, no fine-tuning
        >>> variables = model.finetune_variables()
    """

    method = "finetune"

    def __init__(self, num_classes: int, encoder: dict, **kwargs):
        super().__init__(num_classes, encoder, **kwargs)
        self.classifier = keras.layers.Conv2D(num_classes, 1, name="classifier")

    def support_prototypes(self, support_image, support_mask, training=False):
        """No prototypes: a [B, C, 1] placeholder (the presence) and presence [B, C]."""
        del support_image, training
        presence = support_presence(support_mask, self.num_classes)
        return presence[..., None], presence

    def heads(self, query_features, prototypes, presence, query_image, compute_agm=True):
        del prototypes, compute_agm
        logits = _mask_absent(tf.cast(self.classifier(query_features), tf.float32), presence)
        return self._outputs(logits, query_image, presence=presence, features=query_features)

    def finetune_variables(self) -> list:
        layers = [*self.encoder.decoder[-2:], self.classifier]
        return [v for layer in layers for v in layer.trainable_variables]


_CLASSES = {"sgone": SGOneStage, "panet": PANetStage, "amp": AMPStage, "finetune": FineTuneStage}


def build_baseline(config, stage: int, encoder: dict) -> keras.Model:
    """The baseline of `config.model.method` for a one-shot stage (2 or 3).

    Example:
        >>> model = build_baseline(config, 3, popnet.encoder_kwargs(config))
    """
    m = config.model
    if m.method not in _CLASSES:
        raise ValueError(f"config.model.method must be 'popnet' or one of {METHODS}, "
                         f"got {m.method!r} (see configs/baselines/)")
    if m.kim:
        raise ValueError(f"the {m.method} baseline is single-stage: set config.model.kim=False "
                         f"(configs/baselines/{m.method}.py does)")
    kwargs = {"num_classes": classes.STAGE_NUM_CLASSES[stage], "encoder": encoder,
              "name": f"stage{stage}"}
    if m.method == "sgone":
        kwargs["hidden_convs"] = m.agm_hidden_convs
    elif m.method == "panet":
        kwargs.update(scale=m.panet_scale, align_weight=m.panet_align_weight)
    elif m.method == "amp":
        kwargs.update(alpha=m.amp_alpha, initial_temperature=m.initial_temperature)
    return _CLASSES[m.method](**kwargs)
