"""KnowledgeInfusion (KIM, SPEC §6) against NumPy."""

import numpy as np
import pytest
import tensorflow as tf

from popnet_tf.layers.kim import KnowledgeInfusion
from tests.layer_harness import run_layer_test

EPSILON = 1e-3  # keras.layers.BatchNormalization's default epsilon
MOMENTUM = 0.99  # and its default momentum


def reference_conv_same(x, kernel):
    """3x3 'same' convolution without bias: x [B,h,w,I], kernel [3,3,I,O]."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1:3]
    out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
    for dy in range(3):
        for dx in range(3):
            out += padded[:, dy:dy + h, dx:dx + w, :] @ kernel[dy, dx]
    return out


def reference_bilinear(x, height, width):
    """Bilinear resize with half-pixel centres (TF2 tf.image.resize), x [B,h,w,K]."""
    def taps(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        low = np.floor(src).astype(int)
        return low, np.minimum(low + 1, n_in - 1), src - low

    y0, y1, fy = taps(x.shape[1], height)
    x0, x1, fx = taps(x.shape[2], width)
    rows = x[:, y0] * (1 - fy)[None, :, None, None] + x[:, y1] * fy[None, :, None, None]
    return rows[:, :, x0] * (1 - fx)[None, None, :, None] + rows[:, :, x1] * fx[None, None, :, None]


def reference_kim(a, b, convs, norms, training):
    """ζ([a; b]); norms = [(gamma, beta, moving_mean, moving_var)]; returns (out, batch stats)."""
    if b.shape[1:3] != a.shape[1:3]:
        b = reference_bilinear(b, *a.shape[1:3])
    x = np.concatenate([a, b], axis=-1).astype(np.float64)
    stats = []
    for kernel, (gamma, beta, mean, var) in zip(convs, norms):
        x = reference_conv_same(x, kernel)
        if training:
            mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
            stats.append((mean, var))
        x = np.maximum(gamma * (x - mean) / np.sqrt(var + EPSILON) + beta, 0)
    return x, stats


def built_layer(rng, a, b, filters=5):
    layer = KnowledgeInfusion(filters)
    layer([a, b])
    for conv, norm in zip(layer.convs, layer.norms):
        conv.kernel.assign(rng.normal(scale=0.3, size=conv.kernel.shape))
        norm.gamma.assign(rng.uniform(0.5, 1.5, size=norm.gamma.shape))
        norm.beta.assign(rng.normal(scale=0.3, size=norm.beta.shape))
        norm.moving_mean.assign(rng.normal(scale=0.3, size=norm.moving_mean.shape))
        norm.moving_variance.assign(rng.uniform(0.5, 2.0, size=norm.moving_variance.shape))
    return layer


def weights_of(layer):
    convs = [c.kernel.numpy() for c in layer.convs]
    norms = [(n.gamma.numpy(), n.beta.numpy(), n.moving_mean.numpy(), n.moving_variance.numpy())
             for n in layer.norms]
    return convs, norms


@pytest.mark.parametrize("second_size", [(6, 8), (3, 4)])
def test_kim_inference_matches_numpy(second_size):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 6, 8, 3)).astype(np.float32)
    b = rng.normal(size=(2, *second_size, 4)).astype(np.float32)
    layer = built_layer(rng, a, b)
    out = layer([a, b], training=False)
    assert out.shape == (2, 6, 8, 5)
    want, _ = reference_kim(a, b, *weights_of(layer), training=False)
    np.testing.assert_allclose(out.numpy(), want, atol=1e-4, rtol=1e-4)


def test_kim_training_uses_batch_statistics_and_updates_moving_ones():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(2, 6, 8, 3)).astype(np.float32)
    b = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    layer = built_layer(rng, a, b)
    convs, norms = weights_of(layer)
    out = layer([a, b], training=True)
    want, stats = reference_kim(a, b, convs, norms, training=True)
    np.testing.assert_allclose(out.numpy(), want, atol=1e-4, rtol=1e-4)
    for norm, (_, _, old_mean, old_var), (mean, var) in zip(layer.norms, norms, stats):
        np.testing.assert_allclose(norm.moving_mean.numpy(),
                                   MOMENTUM * old_mean + (1 - MOMENTUM) * mean, atol=1e-5)
        np.testing.assert_allclose(norm.moving_variance.numpy(),
                                   MOMENTUM * old_var + (1 - MOMENTUM) * var, atol=1e-4)
    # Inference leaves the moving statistics alone.
    moving = [n.moving_mean.numpy().copy() for n in layer.norms]
    layer([a, b], training=False)
    for n, m in zip(layer.norms, moving):
        np.testing.assert_array_equal(n.moving_mean.numpy(), m)


def test_kim_gradients_reach_both_inputs():
    rng = np.random.default_rng(2)
    a = tf.Variable(rng.normal(size=(2, 6, 8, 3)).astype(np.float32))
    b = tf.Variable(rng.normal(size=(2, 3, 4, 4)).astype(np.float32))
    layer = built_layer(rng, a, b)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer([a, b], training=True) ** 2)
    grads = tape.gradient(loss, [a, b] + layer.trainable_weights)
    assert all(g is not None and np.abs(g.numpy()).sum() > 0 for g in grads)


def test_kim_rejects_a_single_input():
    with pytest.raises(ValueError, match="kim.py"):
        KnowledgeInfusion(4).build((None, 6, 8, 3))


def test_kim_layer_contract():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(2, 6, 8, 3)).astype(np.float32)
    b = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    # 2 conv kernels + 2 × (gamma, beta) trainable; 2 × (moving mean, variance) not.
    run_layer_test(KnowledgeInfusion, {"filters": 5}, [[a, b]],
                   expected_output_shape=(2, 6, 8, 5), expected_num_trainable_weights=6,
                   expected_num_non_trainable_weights=4, atol=1e-4)
