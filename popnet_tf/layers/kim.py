"""Knowledge Infusion Module (KIM), SPEC §6: a stage's features infused with the previous one's.

Example:
    >>> h2 = KnowledgeInfusion(256)([g1, g2])   # stage 2
    >>> h3 = KnowledgeInfusion(256)([h2, g3])   # stage 3
"""

from __future__ import annotations

import keras
import tensorflow as tf

from popnet_tf.layers.tracking import track_layers


@keras.saving.register_keras_serializable(package="popnet_tf")
class KnowledgeInfusion(keras.layers.Layer):
    """ζ([a; b]): the previous stage's knowledge fused into the current features (KIM).

        h_i = ζ_i([h_{i−1}; g_i]),   ζ = 2 × (3×3 conv without bias, BatchNorm, ReLU),

    [;] the channel concatenation (h_2 = ζ_2([g_1; g_2]), h_3 = ζ_3([h_2; g_3])). The
    output has the spatial size of the first input. If the second input's spatial size
    differs (encoders of different output stride, or odd input sizes rounding
    differently), it is resized to the first's with bilinear interpolation before the
    concatenation: features are smooth fields, and bilinear keeps them continuous where
    nearest neighbour would make blocks. BatchNorm follows `training` (a frozen earlier
    stage is called with training=False by the model).

    Args:
        filters: int, output channels of both convolutions (K).
        **kwargs: passed to `keras.layers.Layer`.

    Call arguments:
        inputs: list `[a, b]`, `a` `[B, h, w, Ka]`, `b` `[B, h', w', Kb]`.
        training: bool, BatchNorm mode.

    Returns:
        `[B, h, w, filters]`.

    Example:
        >>> kim = KnowledgeInfusion(filters=256)
        >>> h3 = kim([h2, g3], training=True)  # [B, h, w, 256]
    """

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters

    def build(self, inputs_shape):
        if not isinstance(inputs_shape, (list, tuple)) or len(inputs_shape) != 2:
            raise ValueError(
                "popnet_tf/layers/kim.py: KnowledgeInfusion takes a list of two feature maps "
                f"[a, b]; got input shape {inputs_shape}.")
        first, second = inputs_shape
        channels = [first[-1] + second[-1], self.filters]
        convs, norms = [], []
        for i, in_channels in enumerate(channels):
            conv = keras.layers.Conv2D(self.filters, 3, padding="same", use_bias=False,
                                       dtype=self.dtype_policy, name=f"conv_{i}")
            norm = keras.layers.BatchNormalization(dtype=self.dtype_policy, name=f"bn_{i}")
            conv.build((None, None, None, in_channels))
            norm.build((None, None, None, self.filters))
            convs.append(conv)
            norms.append(norm)
        # Each item gets its own attribute so tf.train.Checkpoint sees it (tracking.py).
        self.convs = track_layers(self, "conv", convs)
        self.norms = track_layers(self, "norm", norms)

    def call(self, inputs, training=None):
        first, second = inputs
        if first.shape[1:3] != second.shape[1:3] or None in first.shape[1:3]:
            # Sizes differ or are unknown until run time: bilinear to the first's size
            # (the identity when they turn out equal).
            resized = tf.image.resize(second, tf.shape(first)[1:3], method="bilinear")
            second = tf.cast(resized, second.dtype)
        x = tf.concat([first, second], axis=-1)
        for conv, norm in zip(self.convs, self.norms):
            x = tf.nn.relu(norm(conv(x), training=training))
        return x

    def compute_output_shape(self, inputs_shape):
        first = inputs_shape[0]
        return (first[0], first[1], first[2], self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


__all__ = ["KnowledgeInfusion"]
