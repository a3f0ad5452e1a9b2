"""DeepLab v3+ encoder (Chen et al., ECCV 2018): image -> g, the features before the classifier.

SPEC §6: each stage has its own encoder, DeepLab v3+ at output stride 16; g is the
decoder's output before the classifier, K = `filters` channels at 1/4 of the input
resolution.

    image [B, H, W, 3] in 0..255
      -> x / 127.5 - 1                                  (preprocessing inside)
      -> backbone -> low [B, H/4, W/4, C_low], high [B, H/16, W/16, C_high]
      -> ASPP(high): 1x1, three 3x3 atrous (rates 6, 12, 18), image pooling;
         each conv + BN + ReLU; concat; 1x1 projection + BN + ReLU; dropout
      -> bilinear upsampling to low's actual size
      -> concat with 1x1 conv(48) + BN + ReLU of low
      -> decoder_convs x (3x3 conv + BN + ReLU)         = g [B, H/4, W/4, filters]

"H/4" is the backbone's own stride-4 size (ceil(H/4) for "xception" and "small"):
the upsampling targets the low-level tensor's run-time shape, so any input size
works, including sizes not divisible by 16.

Separable convolutions: DeepLab v3+ with Xception uses depthwise-separable 3x3 convs
(depthwise + BN + ReLU, pointwise + BN + ReLU) in ASPP and the decoder (paper §3.3,
reference flags `aspp_with_separable_conv`, `decoder_use_separable_conv`); with them
the Xception-65 model has the published ~41M parameters (regular convs: ~55M).
`separable=None` (default) picks that for "xception" and plain 3x3 convs for the
other backbones, which run faster on CPU.

Why not keras-hub's `DeepLabV3Backbone`/`SpatialPyramidPooling`: the backbone upsamples
by a fixed factor with `UpSampling2D` (wrong for sizes not divisible by 16), ends in
its own head, needs a `pyramid_outputs` backbone; the ASPP builds a `Resizing` layer
on every call (STYLE §1) and has no separable option.

Example:
    >>> encoder = DeepLabV3PlusEncoder(backbone="small", filters=64, aspp_filters=64)
    >>> encoder(np.zeros((2, 96, 96, 3), "float32")).shape
    TensorShape([2, 24, 24, 64])
"""

from __future__ import annotations

import keras
from keras import ops

from popnet_tf.layers.tracking import track_layers
from popnet_tf.models import backbones

try:  # not public API (Keras 3.15, as pinned): tells a model's symbolic build from a real one
    from keras.src.backend.common.stateless_scope import in_stateless_scope
except ImportError:  # another Keras: always defer the weight file to popnet.build_variables
    def in_stateless_scope() -> bool:
        return True


@keras.saving.register_keras_serializable(package="popnet_tf")
class ConvBNReLU(keras.layers.Layer):
    """k x k conv (optionally atrous, optionally depthwise-separable) + BN + ReLU.

    Separable (DeepLab v3+ `split_separable_conv2d`): depthwise k x k + BN + ReLU,
    then pointwise 1x1 + BN + ReLU.

    Args:
        filters: int, output channels.
        kernel_size: int, 1 or 3 (odd).
        dilation_rate: int, atrous rate.
        separable: bool, depthwise-separable instead of a full conv (kernel_size > 1).

    Call: `[B, h, w, C]` -> `[B, h, w, filters]` (padding "same").

    Example:
        >>> ConvBNReLU(64, 3, dilation_rate=6)(np.zeros((1, 8, 8, 32), "float32")).shape
        TensorShape([1, 8, 8, 64])
    """

    def __init__(self, filters, kernel_size=3, dilation_rate=1, separable=False, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = kernel_size
        self.dilation_rate = dilation_rate
        self.separable = separable

    def build(self, input_shape):
        kw = {"dtype": self.dtype_policy}
        channels = input_shape[-1]
        self.depthwise = self.depthwise_norm = None
        if self.separable and self.kernel_size > 1:
            self.depthwise = keras.layers.DepthwiseConv2D(
                self.kernel_size, dilation_rate=self.dilation_rate, padding="same",
                use_bias=False, name="depthwise", **kw)
            self.depthwise_norm = keras.layers.BatchNormalization(name="depthwise_bn", **kw)
            self.depthwise.build(input_shape)
            self.depthwise_norm.build((None, None, None, channels))
            self.conv = keras.layers.Conv2D(self.filters, 1, use_bias=False,
                                            name="pointwise", **kw)
        else:
            self.conv = keras.layers.Conv2D(
                self.filters, self.kernel_size, dilation_rate=self.dilation_rate,
                padding="same", use_bias=False, name="conv", **kw)
        self.conv.build((None, None, None, channels))
        self.norm = keras.layers.BatchNormalization(name="bn", **kw)
        self.norm.build((None, None, None, self.filters))

    def call(self, x, training=None):
        if self.depthwise is not None:
            x = ops.relu(self.depthwise_norm(self.depthwise(x), training=training))
        return ops.relu(self.norm(self.conv(x), training=training))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "kernel_size": self.kernel_size, "dilation_rate": self.dilation_rate,
                "separable": self.separable}


@keras.saving.register_keras_serializable(package="popnet_tf")
class AtrousSpatialPyramidPooling(keras.layers.Layer):
    """ASPP of DeepLab v3/v3+ (Chen et al. 2017, §3.3; 2018, §3.1).

    Branches on the stride-16 features, each conv + BN + ReLU with `filters` outputs:
    a 1x1 conv, one 3x3 atrous conv per rate, and image pooling (global mean -> 1x1
    conv, spread over the map: bilinear upsampling of a 1x1 map is a broadcast).
    Concatenated, projected by 1x1 conv + BN + ReLU, then dropout.

    Args:
        rates: tuple of int, atrous rates (paper at output stride 16: 6, 12, 18).
        filters: int, channels of every branch and of the output.
        dropout: float, dropout rate after the projection (reference code: 0.1).
        separable: bool, depthwise-separable atrous convs (DeepLab v3+ Xception).

    Call: `[B, h, w, C]` -> `[B, h, w, filters]`.

    Example:
        >>> aspp = AtrousSpatialPyramidPooling(rates=(6, 12, 18), filters=256)
        >>> aspp(np.zeros((1, 8, 8, 2048), "float32")).shape
        TensorShape([1, 8, 8, 256])
    """

    def __init__(self, rates=(6, 12, 18), filters=256, dropout=0.0, separable=False,
                 **kwargs):
        super().__init__(**kwargs)
        self.rates = tuple(int(r) for r in rates)
        self.filters = filters
        self.dropout = dropout
        self.separable = separable

    def build(self, input_shape):
        kw = {"dtype": self.dtype_policy}
        # Each branch gets its own attribute so tf.train.Checkpoint sees it (tracking.py).
        branches = [ConvBNReLU(self.filters, 1, name="branch_1x1", **kw)] + [
            ConvBNReLU(self.filters, 3, dilation_rate=rate, separable=self.separable,
                       name=f"branch_rate{rate}", **kw)
            for rate in self.rates]
        self.branches = track_layers(self, "branch", branches)
        self.pooling = ConvBNReLU(self.filters, 1, name="branch_pooling", **kw)
        self.projection = ConvBNReLU(self.filters, 1, name="projection", **kw)
        self.dropout_layer = keras.layers.Dropout(self.dropout, name="dropout", **kw)
        for branch in self.branches:
            branch.build(input_shape)
        self.pooling.build((None, 1, 1, input_shape[-1]))
        self.projection.build((None, None, None, self.filters * (len(self.rates) + 2)))

    def call(self, x, training=None):
        outputs = [branch(x, training=training) for branch in self.branches]  # [B, h, w, F] each
        pooled = ops.mean(x, axis=(1, 2), keepdims=True)                     # [B, 1, 1, C]
        pooled = self.pooling(pooled, training=training)                      # [B, 1, 1, F]
        outputs.append(ops.broadcast_to(pooled, ops.shape(outputs[0])))
        x = ops.concatenate(outputs, axis=-1)                    # [B, h, w, F * (rates + 2)]
        x = self.projection(x, training=training)
        return self.dropout_layer(x, training=training)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)

    def get_config(self):
        return {**super().get_config(), "rates": self.rates, "filters": self.filters,
                "dropout": self.dropout, "separable": self.separable}


@keras.saving.register_keras_serializable(package="popnet_tf")
class DeepLabV3PlusEncoder(keras.layers.Layer):
    """DeepLab v3+ encoder-decoder up to the classifier: image -> g (SPEC §6).

    Args:
        backbone: str, a `backbones.BACKBONE_NAMES` name: "xception" (paper:
            aligned Xception-65, output stride 16) or "small" (CPU), "mobilenet_v2".
        filters: int, K, channels of g (paper: 256).
        aspp_rates: tuple of int, ASPP atrous rates (paper at OS16: 6, 12, 18).
            A rate near the stride-16 map's size leaves only the centre tap
            inside the map (DeepLab v3 §3.3) and is slow on CPU: at 128x128 input
            (8x8 map) 6/12/18 made a training step 3.5x slower than 2/4/6.
        aspp_filters: int, channels of each ASPP branch and of its output.
        low_level_filters: int, channels of the low-level projection (paper: 48).
        decoder_convs: int, number of 3x3 conv + BN + ReLU after the concatenation.
        aspp_dropout: float, dropout after the ASPP projection (reference code: 0.1).
        separable: None, True or False: depthwise-separable 3x3 convs in ASPP and
            decoder; None = True for "xception" (DeepLab v3+), False otherwise.
        backbone_weights: None or path of a `.weights.h5` file saved from the same
            backbone (`encoder.backbone.save_weights(path)`), read when the encoder
            is built. `from_config` (used by `.keras` loading) does not re-read it:
            restored weights come from the archive, and the file may be gone.
        backbone_kwargs: dict or None, extra arguments of `backbones.build_backbone`
            (e.g. `{"widths": (8, 16, 32, 64)}` for "small").
        **kwargs: `keras.layers.Layer` arguments (name, dtype, ...).

    Call arguments:
        images: `[B, H, W, 3]` float, RGB in 0..255 (normalised inside).
        training: bool, BatchNorm and dropout mode.

    Returns:
        g: `[B, h, w, filters]` in the compute dtype, (h, w) the backbone's stride-4
        size (ceil(H/4), ceil(W/4) for "xception" and "small").

    Example:
        >>> encoder = DeepLabV3PlusEncoder(backbone="small", filters=64)
        >>> g = encoder(np.zeros((2, 100, 70, 3), "float32"), training=True)
        >>> g.shape
        TensorShape([2, 25, 18, 64])
    """

    def __init__(self, backbone="small", filters=256, aspp_rates=(6, 12, 18),
                 aspp_filters=256, low_level_filters=48, decoder_convs=2,
                 aspp_dropout=0.1, separable=None, backbone_weights=None,
                 backbone_kwargs=None, **kwargs):
        super().__init__(**kwargs)
        if backbone not in backbones.BACKBONE_NAMES:
            raise ValueError(f"DeepLabV3PlusEncoder: unknown backbone {backbone!r}; choose "
                             f"one of {', '.join(backbones.BACKBONE_NAMES)}.")
        if decoder_convs < 1:
            raise ValueError(f"DeepLabV3PlusEncoder: decoder_convs must be >= 1, got "
                             f"{decoder_convs}.")
        self.backbone_name = backbone
        self.filters = filters
        self.aspp_rates = tuple(int(r) for r in aspp_rates)
        self.aspp_filters = aspp_filters
        self.low_level_filters = low_level_filters
        self.decoder_convs = decoder_convs
        self.aspp_dropout = aspp_dropout
        self.separable = separable
        self.backbone_weights = backbone_weights
        self.backbone_kwargs = dict(backbone_kwargs or {})
        # False when rebuilt by from_config: the weights come from the saved state.
        self._read_backbone_weights = True

    @property
    def uses_separable_convs(self):
        """Whether ASPP and decoder use depthwise-separable 3x3 convs."""
        return self.backbone_name == "xception" if self.separable is None else bool(self.separable)

    def build(self, input_shape):
        kw = {"dtype": self.dtype_policy}
        self.backbone = backbones.build_backbone(
            self.backbone_name, input_shape=(None, None, 3), **kw, **self.backbone_kwargs)
        # Inside a model's symbolic build (a stage without its own `build`: Keras runs
        # `call` in a StatelessScope), the variables are not initialised yet and every
        # assignment of `load_weights` is dropped: the file used to be read and checked
        # while the backbone kept its random weights. Load it once the variables exist
        # (`load_pending_backbone_weights`, called by `popnet.build_variables`).
        self._pending_backbone_weights = bool(self.backbone_weights and self._read_backbone_weights)
        if not in_stateless_scope():
            self.load_pending_backbone_weights()
        low_channels = self.backbone.output["low"].shape[-1]
        high_channels = self.backbone.output["high"].shape[-1]
        separable = self.uses_separable_convs
        self.aspp = AtrousSpatialPyramidPooling(
            self.aspp_rates, self.aspp_filters, dropout=self.aspp_dropout,
            separable=separable, name="aspp", **kw)
        self.aspp.build((None, None, None, high_channels))
        self.low_level_projection = ConvBNReLU(self.low_level_filters, 1,
                                               name="low_level_projection", **kw)
        self.low_level_projection.build((None, None, None, low_channels))
        decoder = []
        channels = self.aspp_filters + self.low_level_filters
        for i in range(self.decoder_convs):
            conv = ConvBNReLU(self.filters, 3, separable=separable,
                              name=f"decoder_conv{i + 1}", **kw)
            conv.build((None, None, None, channels))
            decoder.append(conv)
            channels = self.filters
        self.decoder = track_layers(self, "decoder", decoder)  # visible to tf.train.Checkpoint

    def load_pending_backbone_weights(self):
        """Loads `backbone_weights` into the backbone if the build has not yet (see build)."""
        if getattr(self, "_pending_backbone_weights", False):
            backbones.load_backbone_weights(self.backbone, self.backbone_weights,
                                            name=self.backbone_name)
            self._pending_backbone_weights = False

    def call(self, images, training=None):
        x = ops.cast(images, self.compute_dtype) / 127.5 - 1.0        # [B, H, W, 3] in [-1, 1]
        features = self.backbone(x, training=training)
        low, high = features["low"], features["high"]                   # stride 4, stride 16
        x = self.aspp(high, training=training)                          # [B, h16, w16, A]
        # Upsample to low's run-time size (not 4x a computed size): odd input sizes
        # round differently at each stride.
        x = ops.image.resize(x, ops.shape(low)[1:3], interpolation="bilinear")
        x = ops.cast(x, low.dtype)                                      # [B, h4, w4, A]
        low = self.low_level_projection(low, training=training)        # [B, h4, w4, 48]
        x = ops.concatenate([x, low], axis=-1)
        for conv in self.decoder:
            x = conv(x, training=training)
        return x                                                        # [B, h4, w4, K]

    def compute_output_shape(self, input_shape):
        low = self.backbone.compute_output_shape(tuple(input_shape))["low"]
        return (*low[:-1], self.filters)

    def get_config(self):
        return {**super().get_config(), "backbone": self.backbone_name,
                "filters": self.filters, "aspp_rates": self.aspp_rates,
                "aspp_filters": self.aspp_filters,
                "low_level_filters": self.low_level_filters,
                "decoder_convs": self.decoder_convs, "aspp_dropout": self.aspp_dropout,
                "separable": self.separable, "backbone_weights": self.backbone_weights,
                "backbone_kwargs": self.backbone_kwargs}

    @classmethod
    def from_config(cls, config):
        """Rebuilds the architecture without reading `backbone_weights`.

        Keras calls this when loading a `.keras` file and then restores every weight
        from the archive; re-reading the original file would be wasted work and fail
        when it is no longer there. Use `build_encoder` to read it.
        """
        layer = cls(**config)
        layer._read_backbone_weights = False
        return layer


def build_encoder(config):
    """Builds a `DeepLabV3PlusEncoder` from a dict of its constructor arguments.

    Unlike `DeepLabV3PlusEncoder.from_config`, this reads `backbone_weights` (a fresh
    encoder from a config, e.g. a training run's).

    Example:
        >>> encoder = build_encoder({"backbone": "small", "filters": 64})
    """
    return DeepLabV3PlusEncoder(**dict(config))
