"""DeepLab v3+ encoder (SPEC §6): g at 1/4 resolution with K channels for any input
size, the Keras layer contract, backbone weight files, seeds and mixed precision."""

import inspect
import math
import os

import keras
import numpy as np
import pytest

from popnet_tf.models.encoder import (AtrousSpatialPyramidPooling, DeepLabV3PlusEncoder,
                                      build_encoder)
from tests.layer_harness import run_layer_test

# Small and fast: the CPU backbone with narrow widths.
SMALL = {"backbone": "small", "filters": 32, "aspp_filters": 24, "low_level_filters": 8,
         "aspp_rates": (2, 4, 6), "backbone_kwargs": {"widths": (8, 16, 24, 32)}}


def _images(h, w, batch=2, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (batch, h, w, 3)).astype("float32")


def test_layer_contract():
    # Weights counted by hand: a conv has 1 (kernel, no bias), a BN 2 trainable
    # (gamma, beta) and 2 non-trainable (moving mean, variance).
    # small backbone: 10 convs + 10 BN; ASPP: 1x1, 3 rates, pooling, projection;
    # low-level projection; 2 decoder convs -> 10 + 6 + 1 + 2 = 19 conv + BN pairs.
    pairs = 10 + 6 + 1 + 2
    run_layer_test(DeepLabV3PlusEncoder, SMALL, _images(64, 64),
                   expected_output_shape=(2, 16, 16, 32),
                   expected_num_trainable_weights=3 * pairs,
                   expected_num_non_trainable_weights=2 * pairs)


@pytest.mark.parametrize("size", [(96, 96), (67, 45), (50, 81)])
def test_output_is_quarter_resolution_for_odd_sizes(size):
    h, w = size
    encoder = DeepLabV3PlusEncoder(**SMALL)
    g = encoder(_images(h, w), training=True)
    assert tuple(g.shape) == (2, math.ceil(h / 4), math.ceil(w / 4), 32)
    assert np.all(np.isfinite(g))


def test_dynamic_input_size_in_a_functional_model():
    encoder = DeepLabV3PlusEncoder(**SMALL)
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, encoder(inputs))
    assert tuple(model.output.shape) == (None, None, None, 32)
    for h, w in [(64, 64), (70, 38)]:
        assert tuple(model(_images(h, w, batch=1)).shape) == (1, math.ceil(h / 4),
                                                              math.ceil(w / 4), 32)
    assert encoder.compute_output_shape((None, 70, 38, 3)) == (None, 18, 10, 32)


def test_preprocessing_maps_127_5_to_zero():
    # x / 127.5 - 1 sends 127.5 to 0. With bias-free convs and BN at its initial
    # inference statistics (mean 0, variance 1, beta 0), a zero image stays exactly
    # zero through backbone, ASPP and decoder; any other normalisation would not.
    encoder = DeepLabV3PlusEncoder(**SMALL)
    mid_grey = np.full((1, 32, 32, 3), 127.5, "float32")
    np.testing.assert_array_equal(np.asarray(encoder(mid_grey, training=False)), 0.0)
    black = np.zeros((1, 32, 32, 3), "float32")
    assert np.abs(np.asarray(encoder(black, training=False))).max() > 0


def test_get_config_is_complete():
    encoder = DeepLabV3PlusEncoder(**SMALL, aspp_dropout=0.2, separable=True)
    config = encoder.get_config()
    arguments = set(inspect.signature(DeepLabV3PlusEncoder.__init__).parameters) - {
        "self", "kwargs"}
    assert arguments <= set(config), arguments - set(config)
    assert config["aspp_rates"] == (2, 4, 6) and config["separable"] is True
    assert config["aspp_dropout"] == 0.2
    rebuilt = build_encoder({k: config[k] for k in arguments})
    assert rebuilt.get_config() == {**config, "name": rebuilt.name}


def test_separable_convs_follow_the_backbone():
    assert DeepLabV3PlusEncoder(backbone="xception").uses_separable_convs
    assert not DeepLabV3PlusEncoder(**SMALL).uses_separable_convs
    encoder = DeepLabV3PlusEncoder(**SMALL, separable=True)
    g = encoder(_images(32, 32), training=True)
    assert tuple(g.shape) == (2, 8, 8, 32)
    assert encoder.aspp.branches[1].depthwise is not None        # the rate-2 branch
    assert encoder.aspp.branches[1].depthwise.dilation_rate == (2, 2)
    assert encoder.decoder[0].depthwise is not None


def test_aspp_image_pooling_branch_sees_the_whole_map():
    # Only the image-pooling branch mixes information across the whole map (the rates
    # are small): changing one far corner must change the output at the opposite one.
    aspp = AtrousSpatialPyramidPooling(rates=(1,), filters=4)
    x = np.random.default_rng(0).normal(size=(2, 12, 12, 3)).astype("float32")
    y = np.asarray(aspp(x, training=False))
    x2 = x.copy()
    x2[:, 0, 0, :] += 5.0
    y2 = np.asarray(aspp(x2, training=False))
    assert tuple(y.shape) == (2, 12, 12, 4)
    assert not np.allclose(y[:, -1, -1], y2[:, -1, -1])


def test_backbone_weights_are_loaded(tmp_path):
    source = DeepLabV3PlusEncoder(**SMALL)
    source(_images(32, 32), training=True)  # moves BN statistics away from their init
    path = tmp_path / "backbone.weights.h5"
    source.backbone.save_weights(path)
    loaded = DeepLabV3PlusEncoder(**SMALL, backbone_weights=str(path))
    loaded(_images(32, 32))
    fresh = DeepLabV3PlusEncoder(**SMALL)
    fresh(_images(32, 32))
    x = _images(40, 40, seed=3) / 127.5 - 1.0
    expected = np.asarray(source.backbone(x)["high"])
    np.testing.assert_array_equal(np.asarray(loaded.backbone(x)["high"]), expected)
    assert not np.allclose(np.asarray(fresh.backbone(x)["high"]), expected)

    wrong = DeepLabV3PlusEncoder(**{**SMALL, "backbone_kwargs": {"widths": (8, 16, 24, 48)}},
                                 backbone_weights=str(path))
    with pytest.raises(ValueError, match=r"backbone\.weights\.h5.*do not match"):
        wrong(_images(32, 32))
    missing = DeepLabV3PlusEncoder(**SMALL, backbone_weights=str(tmp_path / "gone.weights.h5"))
    with pytest.raises(FileNotFoundError, match="gone.weights.h5"):
        missing(_images(32, 32))


def test_keras_file_loads_without_the_backbone_weight_file(tmp_path):
    source = DeepLabV3PlusEncoder(**SMALL)
    source(_images(32, 32))
    weights = tmp_path / "backbone.weights.h5"
    source.backbone.save_weights(weights)
    inputs = keras.Input((None, None, 3))
    encoder = DeepLabV3PlusEncoder(**SMALL, backbone_weights=str(weights))
    model = keras.Model(inputs, encoder(inputs))
    model.layers[-1](_images(32, 32), training=True)  # change BN statistics after loading
    archive = tmp_path / "encoder.keras"
    model.save(archive)
    os.remove(weights)  # the .keras archive holds every weight already
    reloaded = keras.models.load_model(archive)
    x = _images(52, 44, batch=1)
    np.testing.assert_allclose(np.asarray(reloaded(x)), np.asarray(model(x)), atol=1e-6)
    assert reloaded.layers[-1].get_config()["backbone_weights"] == str(weights)


def test_deterministic_under_a_seed():
    def run(seed):
        keras.utils.set_random_seed(seed)
        encoder = DeepLabV3PlusEncoder(**SMALL, aspp_dropout=0.5)
        return np.asarray(encoder(_images(32, 32), training=True))  # dropout active

    first, second, other = run(7), run(7), run(8)
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, other)


def test_gradients_reach_every_trainable_weight():
    import tensorflow as tf

    encoder = DeepLabV3PlusEncoder(**SMALL)
    x = _images(48, 48)
    encoder(x)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(encoder(x, training=True)))
    grads = tape.gradient(loss, encoder.trainable_variables)
    missing = [v.path for v, g in zip(encoder.trainable_variables, grads) if g is None]
    assert not missing, missing


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_forward(policy):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        encoder = DeepLabV3PlusEncoder(**SMALL)
        g = encoder(_images(48, 40), training=True)
        assert keras.backend.standardize_dtype(g.dtype) == policy.split("_")[1], g.dtype
        assert tuple(g.shape) == (2, 12, 10, 32)
        assert np.all(np.isfinite(np.asarray(g, dtype="float32")))
        assert all(v.dtype == "float32" for v in encoder.weights)  # variables stay float32
    finally:
        keras.config.set_dtype_policy(previous)


def test_xception_encoder_matches_the_deeplab_v3_plus_size():
    # DeepLab v3+ with aligned Xception-65, separable ASPP and decoder: ~41M parameters
    # (Chen et al. 2018). Built, not run: the backbone's forward is in test_backbones.
    encoder = DeepLabV3PlusEncoder(backbone="xception")
    encoder.build((None, None, None, 3))
    assert 40.5e6 < encoder.count_params() < 42.0e6, encoder.count_params()
    assert encoder.backbone.name == "aligned_xception"
