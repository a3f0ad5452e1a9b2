"""Cosine distance maps, AGM (Eq. 3) and NCM (Eq. 4) against NumPy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from popnet_tf.layers.metric import (AttentionGuidance, CosineSimilarity, NearestCentroid,
                                     cosine_similarity)
from popnet_tf.layers.prototypes import MaskedAveragePooling
from tests.layer_harness import run_layer_test

NEG = -1e4  # the contract's "large negative logit" for absent classes

# presence [B=3, C=5]: all foreground present / some absent / none (background only).
PRESENCE = np.array([[0, 1, 1, 1, 1], [0, 1, 0, 1, 0], [0, 0, 0, 0, 0]], np.float32)


# ---------------------------------------------------------------- NumPy references
def reference_cosine(features, prototypes):
    f = features.astype(np.float64)
    p = prototypes.astype(np.float64)
    dot = np.einsum("bhwk,bck->bhwc", f, p)
    norms = np.linalg.norm(f, axis=-1)[..., None] * np.linalg.norm(p, axis=-1)[:, None, None, :]
    return np.where(norms > 0, dot / np.where(norms > 0, norms, 1), 0.0)


def reference_conv_same(x, kernel, bias):
    """'same' convolution, stride 1, odd kernel: x [B,h,w,I], kernel [k,k,I,O]."""
    k = kernel.shape[0]
    pad = k // 2
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, w = x.shape[1:3]
    out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
    for dy in range(k):
        for dx in range(k):
            out += padded[:, dy:dy + h, dx:dx + w, :] @ kernel[dy, dx]
    return out + bias


def reference_agm(features, maps, presence, trunk, phi, omega):
    """Eq. 3 with r_c formed explicitly for every class; trunk = [(kernel, bias)]."""
    batch, h, w, _ = features.shape
    num_classes = maps.shape[-1]
    phis = np.zeros((batch, h, w, num_classes))
    omegas = np.zeros((batch, h, w, num_classes))
    for c in range(1, num_classes):
        x = maps[..., c:c + 1] * features + features  # r_c
        for kernel, bias in trunk:
            x = np.maximum(reference_conv_same(x, kernel, bias), 0)
        phis[..., c] = reference_conv_same(x, *phi)[..., 0]
        omegas[..., c] = reference_conv_same(x, *omega)[..., 0]
    logits = np.zeros((batch, h, w, num_classes))
    for b in range(batch):
        present = [c for c in range(1, num_classes) if presence[b, c]]
        logits[b, ..., 0] = np.mean(omegas[b][..., present], axis=-1) if present else 0.0
        for c in range(1, num_classes):
            logits[b, ..., c] = phis[b, ..., c] if presence[b, c] else NEG
    return logits


def reference_ncm(maps, presence, tau):
    batch, h, w, num_classes = maps.shape
    logits = np.zeros(maps.shape)
    for b in range(batch):
        present = [c for c in range(1, num_classes) if presence[b, c]]
        m_bg = np.mean(1 - maps[b][..., present], axis=-1) if present else np.ones((h, w))
        logits[b, ..., 0] = tau * m_bg
        for c in range(1, num_classes):
            logits[b, ..., c] = tau * maps[b, ..., c] if presence[b, c] else NEG
    return logits


def random_inputs(rng, dim=6):
    features = rng.normal(size=(3, 4, 5, dim)).astype(np.float32)
    maps = rng.uniform(-1, 1, size=(3, 4, 5, 5)).astype(np.float32)
    return features, maps


# ---------------------------------------------------------------- cosine
def test_cosine_matches_numpy_and_is_zero_for_zero_prototypes():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)
    prototypes = rng.normal(size=(2, 5, 8)).astype(np.float32)
    prototypes[0, 2] = 0
    prototypes[1, 0] = 0
    features[1, 0, 0] = 0  # a zero feature vector too
    maps = cosine_similarity(features, prototypes)
    assert maps.dtype == tf.float32 and maps.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(maps.numpy(), reference_cosine(features, prototypes), atol=1e-6)
    np.testing.assert_array_equal(maps.numpy()[0, ..., 2], 0)


def test_cosine_float16_inputs_and_finite_gradients():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(2, 3, 4, 8)).astype(np.float16)
    prototypes = rng.normal(size=(2, 5, 8)).astype(np.float16)
    prototypes[:, 0] = 0
    maps = cosine_similarity(tf.constant(features), tf.constant(prototypes))
    assert maps.dtype == tf.float32
    np.testing.assert_allclose(maps.numpy(), reference_cosine(features, prototypes), atol=1e-5)
    f, p = tf.Variable(features.astype(np.float32)), tf.Variable(prototypes.astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(cosine_similarity(f, p) ** 2)
    grad_f, grad_p = tape.gradient(loss, [f, p])
    assert np.isfinite(grad_f.numpy()).all() and np.isfinite(grad_p.numpy()).all()
    assert np.abs(grad_f.numpy()).sum() > 0


def test_cosine_layer_contract():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)
    prototypes = rng.normal(size=(2, 5, 8)).astype(np.float32)
    run_layer_test(CosineSimilarity, {}, [features, prototypes],
                   expected_output_shape=(2, 3, 4, 5), expected_num_trainable_weights=0,
                   expected_num_non_trainable_weights=0)


# ---------------------------------------------------------------- AGM
def randomise(layer, rng):
    """Random non-zero weights (biases included), so every term of Eq. 3 is visible."""
    layer.set_weights([rng.normal(scale=0.5, size=w.shape).astype(np.float32)
                       for w in layer.get_weights()])


@pytest.mark.parametrize("hidden_convs", [0, 2])
def test_agm_matches_numpy(hidden_convs):
    rng = np.random.default_rng(3 + hidden_convs)
    features, maps = random_inputs(rng)
    layer = AttentionGuidance(6, hidden_convs=hidden_convs, kernel_size=3)
    layer(features, maps, PRESENCE)
    randomise(layer, rng)
    logits = layer(features, maps, PRESENCE)
    trunk = [(c.kernel.numpy(), c.bias.numpy()) for c in layer.trunk]
    want = reference_agm(features, maps, PRESENCE, trunk,
                         (layer.phi.kernel.numpy(), layer.phi.bias.numpy()),
                         (layer.omega.kernel.numpy(), layer.omega.bias.numpy()))
    assert logits.dtype == tf.float32 and logits.shape == (3, 4, 5, 5)
    np.testing.assert_allclose(logits.numpy(), want, atol=1e-4, rtol=1e-5)
    np.testing.assert_array_equal(logits.numpy()[2, ..., 0], 0)  # no foreground: bg = 0
    probs = tf.nn.softmax(logits).numpy()
    np.testing.assert_array_equal(probs[1][..., [2, 4]], 0)  # absent classes: probability 0


def plain_agm(layer, features, maps, presence):
    """Eq. 3 in TensorFlow the obvious way: r_c formed for every class and put through
    the trunk's convolutions (tf.nn.conv2d, "SAME") one class at a time, so its
    values and gradients check the layer's rewrites (present pairs only, first conv
    shared through its kernel taps)."""
    num_classes = maps.shape[-1]
    phis, omegas = [], []
    for c in range(1, num_classes):
        x = (1.0 + maps[..., c:c + 1]) * features  # r_c = m_c ⊙ h + h
        for conv in layer.trunk:
            x = tf.nn.relu(tf.nn.conv2d(x, conv.kernel, 1, "SAME") + conv.bias)
        phis.append(tf.nn.conv2d(x, layer.phi.kernel, 1, "SAME")[..., 0] + layer.phi.bias)
        omegas.append(tf.nn.conv2d(x, layer.omega.kernel, 1, "SAME")[..., 0] + layer.omega.bias)
    phi, omega = tf.stack(phis, -1), tf.stack(omegas, -1)  # [B, h, w, C-1]
    fg = tf.constant(presence[:, 1:])[:, None, None, :]
    count = tf.reduce_sum(fg, -1)
    background = tf.math.divide_no_nan(tf.reduce_sum(omega * fg, -1), count)
    return tf.concat([background[..., None], tf.where(fg > 0, phi, NEG)], -1)


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 5])
def test_agm_trunk_values_and_gradients_match_plain_formulation(kernel_size):
    """hidden_convs=2 with absent classes (and a sample with none): logits and the
    gradients of a loss w.r.t. features, maps and every weight equal those of the
    plain per-class formulation. Even kernels check "same" padding's asymmetry."""
    rng = np.random.default_rng(11 + kernel_size)
    features, maps = random_inputs(rng)
    layer = AttentionGuidance(6, hidden_convs=2, kernel_size=kernel_size)
    layer(features, maps, PRESENCE)
    randomise(layer, rng)
    # A weighting that reaches every logit but not the masked constants.
    weights = rng.normal(size=(3, 4, 5, 5)).astype(np.float32) * (
        np.concatenate([np.ones((3, 1)), PRESENCE[:, 1:]], 1)[:, None, None, :])
    f, m = tf.Variable(features), tf.Variable(maps)

    def values_and_grads(fn):
        with tf.GradientTape() as tape:
            logits = fn(layer, f, m, PRESENCE)
            loss = tf.reduce_sum(tf.tanh(logits) * weights)
        return logits, tape.gradient(loss, [f, m, *layer.trainable_weights])

    got, got_grads = values_and_grads(lambda lay, *a: lay(*a))
    want, want_grads = values_and_grads(plain_agm)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4, rtol=1e-5)
    assert len(got_grads) == 2 + 8  # features, maps, 2 trunk convs, φ, ω (kernel, bias)
    for g, w in zip(got_grads, want_grads):
        g = tf.convert_to_tensor(g).numpy()
        assert np.abs(w.numpy()).sum() > 0
        np.testing.assert_allclose(g, w.numpy(), atol=2e-4, rtol=1e-4)
    # Absent classes' maps do not reach the logits at all.
    grad_maps = tf.convert_to_tensor(got_grads[1]).numpy()
    np.testing.assert_array_equal(grad_maps[1][..., [0, 2, 4]], 0)
    np.testing.assert_array_equal(grad_maps[2], 0)


def test_agm_mixed_precision_gives_float32_logits():
    rng = np.random.default_rng(5)
    features, maps = random_inputs(rng)
    keras.config.set_dtype_policy("mixed_float16")
    try:
        layer = AttentionGuidance(6, hidden_convs=1)
        layer(features, maps, PRESENCE)
        randomise(layer, rng)
        logits = layer(tf.constant(features, tf.float16), maps, PRESENCE)
    finally:
        keras.config.set_dtype_policy("float32")
    assert layer.compute_dtype == "float16"
    assert logits.dtype == tf.float32
    trunk = [(c.kernel.numpy(), c.bias.numpy()) for c in layer.trunk]
    want = reference_agm(features, maps, PRESENCE, trunk,
                         (layer.phi.kernel.numpy(), layer.phi.bias.numpy()),
                         (layer.omega.kernel.numpy(), layer.omega.bias.numpy()))
    np.testing.assert_allclose(logits.numpy(), want, atol=0.05, rtol=0.02)
    assert (logits.numpy()[1][..., [2, 4]] == NEG).all()  # no float16 overflow to -inf


@pytest.mark.parametrize("hidden_convs,num_weights", [(0, 4), (2, 8)])
def test_agm_layer_contract(hidden_convs, num_weights):
    rng = np.random.default_rng(6)
    features, maps = random_inputs(rng)
    run_layer_test(AttentionGuidance, {"dim": 6, "hidden_convs": hidden_convs, "kernel_size": 3},
                   [features, maps, PRESENCE], expected_output_shape=(3, 4, 5, 5),
                   expected_num_trainable_weights=num_weights,
                   expected_num_non_trainable_weights=0, atol=1e-4)


# ---------------------------------------------------------------- NCM
def test_ncm_matches_numpy_including_no_foreground():
    rng = np.random.default_rng(7)
    _, maps = random_inputs(rng)
    layer = NearestCentroid(initial_temperature=10.0)
    logits = layer(maps, PRESENCE)
    assert logits.dtype == tf.float32
    np.testing.assert_allclose(logits.numpy(), reference_ncm(maps, PRESENCE, 10.0), atol=1e-5)
    np.testing.assert_allclose(logits.numpy()[2, ..., 0], 10.0)  # only background: τ·1
    np.testing.assert_array_equal(logits.numpy()[2, ..., 1:], NEG)
    layer.temperature.assign(3.5)
    np.testing.assert_allclose(layer(maps, PRESENCE).numpy(), reference_ncm(maps, PRESENCE, 3.5),
                               atol=1e-5)


def test_ncm_temperature_is_learnable_and_float16_maps_give_float32():
    rng = np.random.default_rng(8)
    _, maps = random_inputs(rng)
    layer = NearestCentroid()
    with tf.GradientTape() as tape:
        logits = layer(tf.constant(maps, tf.float16), PRESENCE)
        unmasked = tf.where(logits > NEG / 2, logits, 0.0)
        loss = tf.reduce_sum(unmasked)
    assert logits.dtype == tf.float32
    (grad,) = tape.gradient(loss, layer.trainable_weights)
    # d Σ τ·m / dτ = Σ m over the unmasked entries.
    unscaled = np.where(reference_ncm(maps.astype(np.float16), PRESENCE, 1.0) > NEG / 2,
                        reference_ncm(maps.astype(np.float16), PRESENCE, 1.0), 0)
    np.testing.assert_allclose(grad.numpy(), unscaled.sum(), rtol=1e-4)


def test_ncm_layer_contract():
    rng = np.random.default_rng(9)
    _, maps = random_inputs(rng)
    run_layer_test(NearestCentroid, {"initial_temperature": 10.0}, [maps, PRESENCE],
                   expected_output_shape=(3, 4, 5, 5), expected_num_trainable_weights=1,
                   expected_num_non_trainable_weights=0)


# ---------------------------------------------------------------- the chain
def test_gradients_flow_through_pooling_cosine_and_ncm():
    """Support and query features -> MAP -> cosine -> NCM -> loss: the tape's gradient
    matches a central finite difference along a random direction."""
    rng = np.random.default_rng(10)
    support = rng.normal(size=(2, 4, 4, 6))
    query = rng.normal(size=(2, 4, 4, 6))
    labels = np.kron(rng.integers(0, 4, (2, 2, 2)), np.ones((1, 8, 8))).astype(np.int32)
    labels[:, 0, :] = 1  # class 1 always present
    weights = rng.normal(size=(2, 4, 4, 4))
    pooling, ncm = MaskedAveragePooling(4), NearestCentroid()

    def loss_fn(s, q):
        prototypes, presence = pooling(s, labels)
        logits = ncm(cosine_similarity(q, prototypes), presence)
        return tf.reduce_sum(tf.nn.softmax(logits) * weights)  # masked classes: p = 0

    s, q = tf.Variable(support, dtype=tf.float32), tf.Variable(query, dtype=tf.float32)
    with tf.GradientTape() as tape:
        loss = loss_fn(s, q)
    grad_s, grad_q = tape.gradient(loss, [s, q])
    assert np.abs(grad_s.numpy()).sum() > 0 and np.abs(grad_q.numpy()).sum() > 0
    ds, dq = rng.normal(size=support.shape), rng.normal(size=query.shape)
    eps = 1e-2
    numeric = (loss_fn(support + eps * ds, query + eps * dq)
               - loss_fn(support - eps * ds, query - eps * dq)).numpy() / (2 * eps)
    analytic = float(np.sum(grad_s.numpy() * ds) + np.sum(grad_q.numpy() * dq))
    np.testing.assert_allclose(analytic, numeric, rtol=2e-2)
