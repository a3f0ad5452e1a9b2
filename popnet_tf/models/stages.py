"""The stages of POPNet (SPEC §3, §6).

- `ForegroundStage` (stage 1): supervised binary human parser.
- `OneShotStage` (stages 2 and 3): one-shot meta-learner. Its encoder's
  features are infused with the frozen previous stage's (KIM), class
  prototypes come from the support (Eq. 1) and the dynamic store (Eq. 2), and
  two heads score the query: AGM (Eq. 3) and NCM (Eq. 4).

A stage exposes `infused_features(image)`: what the next stage's KIM consumes
(g1 for stage 1, h2 = ζ2([g1; g2]) for stage 2).

Foreground gate (an option of evaluation and serving, not of SPEC §6): a one-shot
stage's probabilities can be combined with stage 1's human probability f,
`gate_by_foreground`: P(bg) = 1 − f·(1 − p_bg), P(c) = f·p_c. One-shot prototypes of
classes never trained on (a new kind of shoe) also match background clutter; stage 1,
trained on every image, knows where the person is.

Example:
    >>> s1 = ForegroundStage(encoder={"backbone": "small", "filters": 64})
    >>> s2 = OneShotStage(num_classes=5, encoder={"backbone": "small", "filters": 64},
    ...                   previous=s1)
    >>> out = s2({"query_image": q, "support_image": s, "support_mask": m})
    >>> out["ncm_probs"].shape  # [B, H, W, 5]
"""

from __future__ import annotations

import keras
from keras import ops

from popnet_tf.layers.kim import KnowledgeInfusion
from popnet_tf.layers.metric import AttentionGuidance, NearestCentroid, cosine_similarity
from popnet_tf.layers.prototypes import MaskedAveragePooling, PrototypeStore
from popnet_tf.models.encoder import DeepLabV3PlusEncoder

PREDICTION_HEADS = ("ncm", "agm", "mean")


def gate_by_foreground(probs, foreground):
    """Class probabilities [B, H, W, C] (background first) gated by a human
    probability [B, H, W, 1]: P(bg) = 1 − f·(1 − p_bg), P(c) = f·p_c for c ≥ 1.
    Still a distribution over the C classes; f = 1 leaves `probs` as they are.

    Example:
        >>> gated = gate_by_foreground(out["ncm_probs"], stage3.foreground_probability(q))
    """
    probs = ops.cast(probs, "float32")
    foreground = ops.cast(foreground, "float32")
    background = 1.0 - foreground * (1.0 - probs[..., :1])
    return ops.concatenate([background, foreground * probs[..., 1:]], axis=-1)


def _resize_logits(logits, like_image):
    """Bilinear resize of [B, h, w, C] logits to the spatial size of an image."""
    size = ops.shape(like_image)[1:3]
    return ops.image.resize(ops.cast(logits, "float32"), size, interpolation="bilinear")


def _freeze(model: keras.Model | None) -> None:
    """Previous stages are frozen while a later stage trains (SPEC §6): their
    weights get no gradient and their BatchNorm runs in inference mode."""
    if model is not None:
        model.trainable = False


@keras.saving.register_keras_serializable(package="popnet_tf")
class ForegroundStage(keras.Model):
    """Stage 1: DeepLab v3+ encoder and a 1x1 classifier into background/human.

    Args:
        encoder: dict of `DeepLabV3PlusEncoder` constructor arguments.
    Call: image [B, H, W, 3] (0..255) -> {"logits", "probs": [B, H, W, 2] float32,
        "features": g1 [B, H/4, W/4, K]}.
    """

    def __init__(self, encoder: dict, **kwargs):
        super().__init__(**kwargs)
        self.encoder_config = dict(encoder)
        self.encoder = DeepLabV3PlusEncoder(**self.encoder_config, name="encoder")
        self.classifier = keras.layers.Conv2D(2, 1, name="classifier")

    def infused_features(self, image, training=False):
        return self.encoder(image, training=training)

    def human_probability(self, features, image):
        """The human probability [B, H, W, 1] float32 of `image` from its features g1
        (this stage's `infused_features`), without running the encoder again."""
        logits = _resize_logits(self.classifier(features), image)
        return ops.cast(ops.softmax(logits, axis=-1)[..., 1:], "float32")

    def call(self, image, training=False):
        features = self.encoder(image, training=training)
        logits = _resize_logits(self.classifier(features), image)
        return {"logits": logits, "probs": ops.softmax(logits, axis=-1), "features": features}

    def get_config(self):
        return {**super().get_config(), "encoder": self.encoder_config}


@keras.saving.register_keras_serializable(package="popnet_tf")
class OneShotStage(keras.Model):
    """Stages 2 and 3: the one-shot meta-learner with dual-metric learning.

    Args:
        num_classes: classes of the stage's label space, background included.
        encoder: dict of `DeepLabV3PlusEncoder` constructor arguments.
        previous: the frozen previous stage (a `ForegroundStage` or `OneShotStage`)
            whose `infused_features` this stage's KIM takes; None disables KIM.
        agm_hidden_convs: 3x3 convs in the AGM trunk before φ and ω.
        momentum: α of the prototype store's EMA (SPEC §6: 0.001).
        initial_temperature: NCM's τ at initialisation (10).
        prediction_head: "ncm" (default, SPEC §6), "agm" or "mean".
        dynamic_prototypes: whether the stage uses its store (DP): base classes
            read the store at test (`test_prototypes`). False (the ablation rows
            without DP) keeps every class on its static support prototype.
    Call: {"query_image" [B,H,W,3], "support_image" [B,H',W',3],
        "support_mask" [B,H',W'] int} -> dict with "agm_logits", "ncm_logits",
        "agm_probs", "ncm_probs", "probs" (the prediction head's) at the query's
        resolution, float32, and the intermediates "prototypes" [B,C,K],
        "presence" [B,C], "distance_maps" [B,h,w,C], "features" [B,h,w,K].
        `use_dynamic` (bool) selects dynamic prototypes (after warmup); ignored
        (static prototypes) when `dynamic_prototypes` is False.
    """

    def __init__(self, num_classes: int, encoder: dict, previous=None,
                 agm_hidden_convs: int = 0, momentum: float = 0.001,
                 initial_temperature: float = 10.0, prediction_head: str = "ncm",
                 dynamic_prototypes: bool = True, **kwargs):
        super().__init__(**kwargs)
        if prediction_head not in PREDICTION_HEADS:
            raise ValueError(f"prediction_head must be one of {PREDICTION_HEADS}, got {prediction_head!r}")
        self.num_classes = num_classes
        self.encoder_config = dict(encoder)
        self.previous = previous
        self.agm_hidden_convs = agm_hidden_convs
        self.momentum = momentum
        self.initial_temperature = initial_temperature
        self.prediction_head = prediction_head
        self.dynamic_prototypes = bool(dynamic_prototypes)
        filters = self.encoder_config.get("filters", 256)
        self.encoder = DeepLabV3PlusEncoder(**self.encoder_config, name="encoder")
        self.kim = KnowledgeInfusion(filters, name="kim") if previous is not None else None
        self.pooling = MaskedAveragePooling(num_classes, name="masked_average_pooling")
        self.store = PrototypeStore(num_classes, filters, momentum=momentum, name="prototype_store")
        self.agm = AttentionGuidance(filters, hidden_convs=agm_hidden_convs, name="agm")
        self.ncm = NearestCentroid(initial_temperature, name="ncm")
        _freeze(previous)

    def build(self, input_shape):
        """Creates every variable from the inputs' shapes (a dict like the call's).

        Keras builds a subclassed model by tracing `call` on symbolic inputs, but the
        NCM prediction path never calls the AGM, so the traced build left it unbuilt
        (Keras warned; `keras.models.load_model` would build without it). The AGM's
        weights depend only on K, so it is built after the trace: last, as the trace
        left it, so the initialisers' seeds are drawn in the same order as before.
        """
        inputs = {key: keras.KerasTensor(shape, dtype="int32" if key == "support_mask"
                                         else "float32")
                  for key, shape in input_shape.items()}
        self.compute_output_spec(inputs, training=False, use_dynamic=False)
        if not self.agm.built:
            self.agm.build()

    # --- building blocks, public so evaluation and export can reuse a support ---
    def infused_features(self, image, training=False):
        """h = ζ([h_prev; g]) with the frozen previous stage, or g without KIM."""
        return self._features_and_g1(image, training)[0]

    def _features_and_g1(self, image, training):
        """(h, g1): this stage's features and, from the same pass through the KIM chain,
        stage 1's features g1 (None without KIM). Unused g1 costs nothing: it is an
        intermediate of h."""
        features = self.encoder(image, training=training)
        if self.kim is None:
            return features, None
        if isinstance(self.previous, OneShotStage):
            prior, g1 = self.previous._features_and_g1(image, training=False)
        else:
            prior = g1 = self.previous.infused_features(image, training=False)
        # Frozen: no gradient goes back into the previous stage. Its variables are still
        # watched by the tape (Keras' trainable=False does not unwatch them), so without
        # this the step's graph holds ~2,600 dead gradient ops the runtime prunes.
        prior = ops.stop_gradient(prior)
        return self.kim([prior, features], training=training), g1

    # The gate's formula, for code that holds the model only (serving).
    gate_by_foreground = staticmethod(gate_by_foreground)

    def features_and_foreground(self, image):
        """(h, f) for inference: this stage's features [B, h, w, K] and stage 1's human
        probability f [B, H, W, 1] float32 (the foreground gate), in one pass: stage 1's
        encoder runs once, inside the KIM chain. Raises ValueError without stage 1."""
        stage1 = self.foreground_stage()
        features, g1 = self._features_and_g1(image, training=False)
        return features, stage1.human_probability(g1, image)

    def support_prototypes(self, support_image, support_mask, training=False):
        """Static prototypes p_c (Eq. 1) [B, C, K] float32 and presence [B, C]."""
        features = self.infused_features(support_image, training=training)
        return self.pooling(features, support_mask)

    def foreground_stage(self):
        """The frozen stage 1 at the start of this stage's `previous` chain. Raises
        ValueError for a stage without one (the ablations without KIM)."""
        stage = self.previous
        while stage is not None and not isinstance(stage, ForegroundStage):
            stage = getattr(stage, "previous", None)
        if stage is None:
            raise ValueError("the foreground gate needs stage 1, but this stage has no "
                             "previous stages (KIM off); evaluate or serve it without the gate")
        return stage

    def foreground_probability(self, image):
        """Stage 1's human probability [B, H, W, 1] float32 for `image` [B, H, W, 3]
        (the foreground gate, module doc). Runs stage 1 on its own: where this stage's
        features are needed too, `features_and_foreground` saves that encoder pass."""
        stage1 = self.foreground_stage()
        return stage1.human_probability(stage1.infused_features(image, training=False), image)

    def foreground_gated(self, probs, image):
        """`probs` [B, H, W, C] of `image` gated by its stage-1 human probability."""
        return gate_by_foreground(probs, self.foreground_probability(image))

    def test_prototypes(self, static, presence):
        """p̂ for evaluation and serving: the store's blend for the base classes it has
        seen when the stage uses dynamic prototypes (SPEC §6), else the static p_c."""
        return self.store(static, presence, training=False, use_dynamic=self.dynamic_prototypes)

    def heads(self, query_features, prototypes, presence, query_image, compute_agm=True):
        """Distance maps and the two heads' logits at the query's resolution. AGM is
        computed when asked (`compute_agm`) and whenever it is the stage's prediction head,
        whose "probs" it gives (an AGM-only model served or scored with the NCM head)."""
        compute_agm = compute_agm or self.prediction_head != "ncm"
        maps = cosine_similarity(query_features, prototypes)  # [B, h, w, C] float32
        out = {"distance_maps": maps, "presence": presence, "prototypes": prototypes,
               "features": query_features}
        ncm_logits = _resize_logits(self.ncm(maps, presence), query_image)
        out["ncm_logits"] = ncm_logits
        out["ncm_probs"] = ops.softmax(ncm_logits, axis=-1)
        if compute_agm:
            agm_logits = _resize_logits(self.agm(query_features, maps, presence), query_image)
            out["agm_logits"] = agm_logits
            out["agm_probs"] = ops.softmax(agm_logits, axis=-1)
        if self.prediction_head == "ncm":
            out["probs"] = out["ncm_probs"]
        elif self.prediction_head == "agm":
            out["probs"] = out["agm_probs"]
        else:
            out["probs"] = 0.5 * (out["agm_probs"] + out["ncm_probs"])
        return out

    def call(self, inputs, training=False, use_dynamic=True):
        if not self.dynamic_prototypes:
            # A stage without DP never reads its store (the ablation rows without DP):
            # at test as in `test_prototypes`, so a plain call agrees with evaluation.
            use_dynamic = False
        static, presence = self.support_prototypes(
            inputs["support_image"], inputs["support_mask"], training=training)
        prototypes = self.store(static, presence, training=training, use_dynamic=use_dynamic)
        query_features = self.infused_features(inputs["query_image"], training=training)
        return self.heads(query_features, prototypes, presence, inputs["query_image"],
                          compute_agm=training or self.prediction_head != "ncm")

    def get_config(self):
        config = {
            **super().get_config(),
            "num_classes": self.num_classes,
            "encoder": self.encoder_config,
            "previous": (keras.saving.serialize_keras_object(self.previous)
                         if self.previous is not None else None),
            "agm_hidden_convs": self.agm_hidden_convs,
            "momentum": self.momentum,
            "initial_temperature": self.initial_temperature,
            "prediction_head": self.prediction_head,
            "dynamic_prototypes": self.dynamic_prototypes,
        }
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("previous") is not None:
            config["previous"] = keras.saving.deserialize_keras_object(config["previous"])
        return cls(**config)
