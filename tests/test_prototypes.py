"""MaskedAveragePooling (Eq. 1) and PrototypeStore (Eq. 2, SPEC §6) against NumPy."""

import os
import subprocess
import sys
import tempfile
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from popnet_tf.layers.prototypes import MaskedAveragePooling, PrototypeStore
from tests.layer_harness import run_layer_test

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- NumPy references
def nearest_indices(n_in, n_out):
    """Source index of each output pixel, half-pixel centres (TF2 nearest resize)."""
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * n_in / n_out).astype(int), n_in - 1)


def area_matrix(n_in, n_out):
    """[n_out, n_in]: fraction of output cell o covered by input pixel i, rows sum to 1."""
    scale = n_in / n_out
    a = np.zeros((n_out, n_in))
    for o in range(n_out):
        lo, hi = o * scale, (o + 1) * scale
        for i in range(n_in):
            a[o, i] = max(0.0, min(hi, i + 1) - max(lo, i)) / scale
    return a


def reference_pooling(features, labels, num_classes):
    """Eq. 1 with nearest-resized masks, area fallback for vanished classes."""
    features = features.astype(np.float64)
    batch, h, w, dim = features.shape
    _, big_h, big_w = labels.shape
    small = labels[:, nearest_indices(big_h, h)][:, :, nearest_indices(big_w, w)]
    ay, ax = area_matrix(big_h, h), area_matrix(big_w, w)
    prototypes = np.zeros((batch, num_classes, dim))
    presence = np.zeros((batch, num_classes))
    for b in range(batch):
        for c in range(1, num_classes):
            full = labels[b] == c
            if not full.any():
                continue
            presence[b, c] = 1
            selected = small[b] == c
            if selected.any():
                prototypes[b, c] = features[b][selected].mean(axis=0)
            else:
                weights = ay @ full.astype(np.float64) @ ax.T  # [h, w]
                prototypes[b, c] = (weights[..., None] * features[b]).sum((0, 1)) / weights.sum()
    return prototypes, presence


def reference_store_step(store, seen, prototypes, presence, alpha):
    store, seen = store.copy(), seen.copy()
    for c in range(store.shape[0]):
        count = presence[:, c].sum()
        if count == 0:
            continue
        mean = (presence[:, c, None] * prototypes[:, c]).sum(0) / count
        store[c] = mean if seen[c] == 0 else (1 - alpha) * store[c] + alpha * mean
        seen[c] = 1
    return store, seen


def reference_blend(store, seen, prototypes, presence, alpha, use_dynamic):
    out = prototypes.copy()
    for b in range(prototypes.shape[0]):
        for c in range(prototypes.shape[1]):
            if use_dynamic and seen[c] and presence[b, c]:
                out[b, c] = (1 - alpha) * store[c] + alpha * prototypes[b, c]
    return out


# ---------------------------------------------------------------- fixtures
def support_batch(rng):
    """Four supports at 16x16 over 4x4 features (C = 5), built to hit each edge case."""
    labels = np.zeros((4, 16, 16), np.int32)
    # Sample 0: random blocks of 1..3 with some 255; class 4 is one pixel at (0, 0),
    # which the nearest resize (rows/cols 2, 6, 10, 14) never samples.
    labels[0] = np.kron(rng.integers(0, 4, (4, 4)), np.ones((4, 4), np.int32))
    labels[0, 3:5, :] = 255
    labels[0, 0, 0] = 4
    # Sample 1: all background, some ignore pixels: no prototype at all.
    labels[1, 5:9, 5:9] = 255
    # Sample 2: class 1 large; class 3 two pixels in different cells, both vanished;
    # a row of 255 over sampled pixels.
    labels[2, 8:, :] = 1
    labels[2, 1, 1] = 3
    labels[2, 5, 13] = 3
    labels[2, 10, :] = 255
    # Sample 3: everything ignored.
    labels[3] = 255
    features = rng.normal(size=(4, 4, 4, 6)).astype(np.float32)
    return features, labels


# ---------------------------------------------------------------- MaskedAveragePooling
def test_pooling_matches_numpy_with_edge_cases():
    rng = np.random.default_rng(0)
    features, labels = support_batch(rng)
    prototypes, presence = MaskedAveragePooling(5)(features, labels)
    want_p, want_presence = reference_pooling(features, labels, 5)
    assert prototypes.dtype == tf.float32 and presence.dtype == tf.float32
    np.testing.assert_array_equal(presence.numpy(), want_presence)
    np.testing.assert_allclose(prototypes.numpy(), want_p, atol=1e-5)
    # The cases the fixture was built for, spelled out.
    assert presence.numpy()[0, 4] == 1  # the one-pixel class is not lost...
    np.testing.assert_allclose(prototypes.numpy()[0, 4], features[0, 0, 0], atol=1e-6)  # ...its cell
    np.testing.assert_allclose(  # two vanished pixels, equal area weights: the two cells' mean
        prototypes.numpy()[2, 3], 0.5 * (features[2, 0, 0] + features[2, 1, 3]), atol=1e-6)
    np.testing.assert_array_equal(presence.numpy()[1], 0)  # all-background support
    np.testing.assert_array_equal(presence.numpy()[3], 0)  # all-ignore support
    np.testing.assert_array_equal(presence.numpy()[:, 0], 0)  # never a background prototype
    np.testing.assert_array_equal(prototypes.numpy()[:, 0], 0)
    np.testing.assert_array_equal(prototypes.numpy()[1], 0)  # absent -> zeros


def test_pooling_non_integer_stride_and_random_masks():
    rng = np.random.default_rng(1)
    labels = rng.choice([0, 1, 2, 3, 4, 5, 6, 255], size=(3, 13, 11)).astype(np.int32)
    labels[1] = np.where(labels[1] == 6, 0, labels[1])  # class 6 absent in sample 1
    features = rng.normal(size=(3, 4, 3, 5)).astype(np.float32)
    prototypes, presence = MaskedAveragePooling(7)(features, labels)
    want_p, want_presence = reference_pooling(features, labels, 7)
    np.testing.assert_array_equal(presence.numpy(), want_presence)
    np.testing.assert_allclose(prototypes.numpy(), want_p, atol=1e-5)


def test_pooling_fallback_with_fractional_cells():
    # 13x11 -> 4x3: nearest samples rows 1, 4, 8, 11 and columns 1, 5, 9 only, and the
    # area cells are 3.25 x 3.67 pixels, so lone pixels straddle two cells.
    labels = np.zeros((1, 13, 11), np.int32)
    labels[0, 5, 3] = 2  # row 5 inside cell 1; column 3 lies 2/3 in cell 0, 1/3 in cell 1
    labels[0, 3, 7] = 1  # row 3 lies 1/4 in cell 0, 3/4 in cell 1
    labels[0, 12, 10] = 3  # the far corner
    labels[0, 8:10, 5] = 4  # sampled: ordinary nearest pooling
    rng = np.random.default_rng(12)
    features = rng.normal(size=(1, 4, 3, 5)).astype(np.float32)
    prototypes, presence = MaskedAveragePooling(5)(features, labels)
    want_p, want_presence = reference_pooling(features, labels, 5)
    np.testing.assert_array_equal(presence.numpy(), want_presence)
    np.testing.assert_allclose(prototypes.numpy(), want_p, atol=1e-5)
    np.testing.assert_allclose(  # by hand: cells (1, 0) and (1, 1) weighted 2/3 and 1/3
        prototypes.numpy()[0, 2], (2 * features[0, 1, 0] + features[0, 1, 1]) / 3, atol=1e-5)


def test_pooling_float16_features_give_float32():
    rng = np.random.default_rng(2)
    features, labels = support_batch(rng)
    prototypes, presence = MaskedAveragePooling(5)(tf.constant(features, tf.float16), labels)
    assert prototypes.dtype == tf.float32 and presence.dtype == tf.float32
    want_p, _ = reference_pooling(features.astype(np.float16), labels, 5)
    np.testing.assert_allclose(prototypes.numpy(), want_p, atol=1e-5)


def test_pooling_gradient_is_the_pooling_weights():
    rng = np.random.default_rng(3)
    features, labels = support_batch(rng)
    upstream = rng.normal(size=(4, 5, 6)).astype(np.float32)
    x = tf.Variable(features)
    with tf.GradientTape() as tape:
        prototypes, _ = MaskedAveragePooling(5)(x, labels)
        loss = tf.reduce_sum(prototypes * upstream)
    grad = tape.gradient(loss, x).numpy()
    # d loss / d h(b, y, x, k) = Σ_c weight_c(y, x) / Σ weight_c · upstream[b, c, k]; the
    # weights of each class are recovered from the reference with one-hot features.
    eye = np.eye(16).reshape(16, 4, 4).transpose(1, 2, 0)  # features = pixel one-hot
    want = np.zeros_like(grad)
    for b in range(4):
        pixel_weights, _ = reference_pooling(np.repeat(eye[None], 1, 0), labels[b:b + 1], 5)
        want[b] = np.einsum("cp,ck->pk", pixel_weights[0], upstream[b]).reshape(4, 4, 6)
    np.testing.assert_allclose(grad, want, atol=1e-5)
    assert np.abs(grad[0]).sum() > 0


def test_pooling_layer_contract():
    rng = np.random.default_rng(4)
    features, labels = support_batch(rng)
    run_layer_test(MaskedAveragePooling, {"num_classes": 5}, [features, labels],
                   expected_output_shape=(4, 5, 6), expected_num_trainable_weights=0,
                   expected_num_non_trainable_weights=0)


# ---------------------------------------------------------------- PrototypeStore
ALPHA = 0.3  # large, so that the EMA's terms are all visible in the numbers


def episode(rng, present):
    """Prototypes [B=3, C=5, K=4] and presence with `present[b]` the classes of sample b."""
    presence = np.zeros((3, 5), np.float32)
    for b, classes in enumerate(present):
        presence[b, list(classes)] = 1
    prototypes = rng.normal(size=(3, 5, 4)).astype(np.float32) * presence[..., None]
    return prototypes, presence


STEPS = [  # class 2 twice in step 0; 4 only in step 1; an empty step; 1 again at the end
    [(1, 2), (2,), ()],
    [(2, 4), (), (3,)],
    [(), (), ()],
    [(1,), (1, 3), (2,)],
]


def test_store_ema_over_steps_matches_numpy():
    rng = np.random.default_rng(5)
    layer = PrototypeStore(5, 4, momentum=ALPHA)
    store, seen = np.zeros((5, 4)), np.zeros(5)
    for present in STEPS:
        prototypes, presence = episode(rng, present)
        before = layer.prototypes.numpy().copy() if layer.built else np.zeros((5, 4))
        p_hat = layer(prototypes, presence, training=True)
        store, seen = reference_store_step(store, seen, prototypes, presence, ALPHA)
        np.testing.assert_allclose(layer.prototypes.numpy(), store, atol=1e-6)
        np.testing.assert_array_equal(layer.seen.numpy(), seen)
        np.testing.assert_allclose(  # the blend uses the store *after* this step's update
            p_hat.numpy(), reference_blend(store, seen, prototypes, presence, ALPHA, True),
            atol=1e-6)
        absent = presence.sum(0) == 0
        np.testing.assert_array_equal(layer.prototypes.numpy()[absent], before[absent])
    # First sighting initialises instead of shrinking towards zero: class 4 seen once.
    np.testing.assert_allclose(layer.seen.numpy(), [0, 1, 1, 1, 1])
    assert np.abs(layer.prototypes.numpy()[4]).sum() > 0.5
    np.testing.assert_array_equal(layer.prototypes.numpy()[0], 0)


def test_store_use_dynamic_false_returns_static_but_still_updates():
    rng = np.random.default_rng(6)
    layer = PrototypeStore(5, 4, momentum=ALPHA)
    for present in STEPS[:2]:
        prototypes, presence = episode(rng, present)
        p_hat = layer(prototypes, presence, training=True, use_dynamic=False)
        np.testing.assert_array_equal(p_hat.numpy(), prototypes)
    assert layer.seen.numpy()[[1, 2, 3, 4]].tolist() == [1, 1, 1, 1]


def test_store_inference_reads_but_does_not_update():
    rng = np.random.default_rng(7)
    layer = PrototypeStore(5, 4, momentum=ALPHA)
    layer(*episode(rng, STEPS[0]), training=True)  # classes 1, 2 seen
    store, seen = layer.prototypes.numpy().copy(), layer.seen.numpy().copy()
    prototypes, presence = episode(rng, [(1, 3), (2,), (1, 2, 3)])  # 3 never seen: "novel"
    p_hat = layer(prototypes, presence).numpy()  # training defaults to False
    np.testing.assert_array_equal(layer.prototypes.numpy(), store)
    np.testing.assert_array_equal(layer.seen.numpy(), seen)
    np.testing.assert_allclose(
        p_hat, reference_blend(store, seen, prototypes, presence, ALPHA, True), atol=1e-6)
    np.testing.assert_array_equal(p_hat[:, 3], prototypes[:, 3])  # novel: static
    np.testing.assert_array_equal(
        layer(prototypes, presence, use_dynamic=False).numpy(), prototypes)


def test_store_in_tf_function_with_tensor_flag_and_gradient():
    rng = np.random.default_rng(8)
    layer = PrototypeStore(5, 4, momentum=ALPHA)

    @tf.function
    def step(prototypes, presence, use_dynamic):
        with tf.GradientTape() as tape:
            tape.watch(prototypes)
            p_hat = layer(prototypes, presence, training=True, use_dynamic=use_dynamic)
            loss = tf.reduce_sum(p_hat)
        return p_hat, tape.gradient(loss, prototypes)

    store, seen = np.zeros((5, 4)), np.zeros(5)
    for i, present in enumerate(STEPS):
        prototypes, presence = episode(rng, present)
        use = i % 2 == 1
        p_hat, grad = step(tf.constant(prototypes), tf.constant(presence), tf.constant(use))
        store, seen = reference_store_step(store, seen, prototypes, presence, ALPHA)
        np.testing.assert_allclose(
            p_hat.numpy(), reference_blend(store, seen, prototypes, presence, ALPHA, use),
            atol=1e-6)
        # stop_gradient on the store: a blended prototype passes back α, a static one 1,
        # although this step's store was computed from these very prototypes.
        blended = use & (presence > 0) & (seen[None] > 0)
        np.testing.assert_allclose(grad.numpy(), np.where(blended, ALPHA, 1.0)[..., None]
                                   * np.ones((1, 1, 4)), atol=1e-6)
    np.testing.assert_allclose(layer.prototypes.numpy(), store, atol=1e-6)


def test_store_inside_model_subclass_and_checkpoints():
    rng = np.random.default_rng(9)

    class Head(keras.Model):
        def __init__(self):
            super().__init__()
            self.store = PrototypeStore(5, 4, momentum=ALPHA)

        def call(self, prototypes, presence, training=False):
            return self.store(prototypes, presence, training=training)

    model = Head()
    train = tf.function(lambda p, m: model(p, m, training=True))
    store, seen = np.zeros((5, 4)), np.zeros(5)
    for present in STEPS:
        prototypes, presence = episode(rng, present)
        train(tf.constant(prototypes), tf.constant(presence))
        store, seen = reference_store_step(store, seen, prototypes, presence, ALPHA)
    np.testing.assert_allclose(model.store.prototypes.numpy(), store, atol=1e-6)
    assert len(model.non_trainable_weights) == 2 and not model.trainable_weights

    with tempfile.TemporaryDirectory() as tmp:
        path = tf.train.Checkpoint(model=model).write(os.path.join(tmp, "ckpt"))
        restored = Head()
        restored(*episode(rng, STEPS[0]))  # build, store all zeros
        tf.train.Checkpoint(model=restored).read(path).assert_consumed()
    np.testing.assert_allclose(restored.store.prototypes.numpy(), store, atol=1e-6)
    np.testing.assert_array_equal(restored.store.seen.numpy(), seen)


def test_filled_store_survives_keras_save():
    rng = np.random.default_rng(10)
    layer = PrototypeStore(5, 4, momentum=ALPHA)
    for present in STEPS:
        layer(*episode(rng, present), training=True)
    p_in, m_in = keras.Input((5, 4)), keras.Input((5,))
    model = keras.Model([p_in, m_in], layer(p_in, m_in))
    prototypes, presence = episode(rng, [(1, 2, 3, 4), (1,), (4,)])
    expected = model([prototypes, presence]).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "store.keras")
        model.save(path)
        reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(reloaded.layers[-1].prototypes.numpy(), layer.prototypes.numpy())
    np.testing.assert_allclose(reloaded([prototypes, presence]).numpy(), expected, atol=1e-6)
    assert not np.allclose(expected, prototypes)  # the store really took part


def test_store_layer_contract():
    rng = np.random.default_rng(11)
    prototypes, presence = episode(rng, STEPS[0])
    run_layer_test(PrototypeStore, {"num_classes": 5, "dim": 4, "momentum": 0.001},
                   [prototypes, presence], expected_output_shape=(3, 5, 4),
                   expected_num_trainable_weights=0, expected_num_non_trainable_weights=2)


def test_store_rejects_wrong_dim():
    with pytest.raises(ValueError, match="prototypes.py"):
        PrototypeStore(5, 8)(np.zeros((2, 5, 4), np.float32), np.zeros((2, 5), np.float32))


MIRRORED_SCRIPT = textwrap.dedent("""
    import numpy as np
    import tensorflow as tf
    # Two logical CPUs; must happen before any TF op runs in this process.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from popnet_tf.layers.prototypes import PrototypeStore

    rng = np.random.default_rng(0)
    steps = []
    for classes in ([(1,), (1, 2), (2, 3), (3,)], [(4,), (), (1, 4), (1,)],
                    [(), (), (), ()], [(2,), (3,), (1, 2, 3), (4,)]):
        presence = np.zeros((4, 5), np.float32)
        for b, cs in enumerate(classes):
            presence[b, list(cs)] = 1
        steps.append((rng.normal(size=(4, 5, 3)).astype(np.float32) * presence[..., None],
                      presence))

    single = PrototypeStore(5, 3, momentum=0.3)
    single_out = [single(p, m, training=True).numpy() for p, m in steps]

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        store = PrototypeStore(5, 3, momentum=0.3)
        store.build((None, 5, 3), (None, 5))

    @tf.function
    def step(p, m):
        return strategy.run(lambda a, b: store(a, b, training=True), args=(p, m))

    def split(x):  # replica r gets samples 2r, 2r+1 of the global batch
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(x[2 * ctx.replica_id_in_sync_group:
                                      2 * ctx.replica_id_in_sync_group + 2]))

    for (p, m), want in zip(steps, single_out):
        out = strategy.experimental_local_results(step(split(p), split(m)))
        np.testing.assert_allclose(np.concatenate([o.numpy() for o in out]), want, atol=1e-6)
    for name in ("prototypes", "seen"):
        mirrored = getattr(store, name).value
        for replica_value in strategy.experimental_local_results(mirrored):
            np.testing.assert_allclose(replica_value.numpy(), getattr(single, name).numpy(),
                                       atol=1e-6)
    print("MIRRORED_OK")
""")


def test_store_under_mirrored_strategy_equals_one_device():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
               KERAS_BACKEND="tensorflow", PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "MIRRORED_OK" in result.stdout, result.stderr[-5000:]
