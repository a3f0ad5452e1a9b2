"""Backbones (SPEC §6): strides, channels, dynamic and odd sizes, the aligned
Xception-65 architecture, and weight files (SPEC §7: a user's file must load)."""

import math

import numpy as np
import pytest

from popnet_tf.models import backbones


def _image(h, w, batch=1, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, h, w, 3)).astype("float32")


@pytest.mark.parametrize("size", [(64, 64), (96, 64), (67, 45), (50, 33)])
def test_small_strides_for_any_size(size):
    h, w = size
    model = backbones.build_backbone("small")  # input (None, None, 3): one model, any size
    features = model(_image(h, w, batch=2))
    assert tuple(features["low"].shape) == (2, math.ceil(h / 4), math.ceil(w / 4), 32)
    assert tuple(features["high"].shape) == (2, math.ceil(h / 16), math.ceil(w / 16), 128)


def test_small_widths_and_blocks():
    model = backbones.build_backbone("small", widths=(8, 12, 20, 24), blocks=(2, 1, 3))
    features = model(_image(64, 32))
    assert tuple(features["low"].shape) == (1, 16, 8, 12)
    assert tuple(features["high"].shape) == (1, 4, 2, 24)
    # Parameters by hand: 3x3 convs without bias, BN = 4 numbers per channel.
    conv = lambda cin, cout: 9 * cin * cout + 4 * cout  # noqa: E731
    expected = (conv(3, 8) + conv(8, 12) + 2 * 2 * conv(12, 12)
                + conv(12, 20) + 1 * 2 * conv(20, 20)
                + conv(20, 24) + 3 * 2 * conv(24, 24))
    assert model.count_params() == expected


def test_small_is_batchnormed():
    model = backbones.build_backbone("small")
    kinds = {type(layer).__name__ for layer in model.layers}
    assert "BatchNormalization" in kinds


def test_mobilenet_v2_strides():
    model = backbones.build_backbone("mobilenet_v2", alpha=0.35)
    features = model(_image(64, 96))
    # alpha 0.35: 24 -> 8 and 96 -> 32 channels (MobileNetV2's rounding to 8).
    assert tuple(features["low"].shape) == (1, 16, 24, 8)
    assert tuple(features["high"].shape) == (1, 4, 6, 32)


def _xception65_param_count():
    """Aligned Xception-65 of DeepLab v3+ counted by hand (BN: 4 numbers per channel)."""
    bn = lambda c: 4 * c  # noqa: E731

    def sep(cin, cout):  # depthwise 3x3 + BN, pointwise 1x1 + BN
        return 9 * cin + bn(cin) + cin * cout + bn(cout)

    def block(cin, depths, shortcut):
        total, c = 0, cin
        for d in depths:
            total, c = total + sep(c, d), d
        return total + (cin * depths[-1] + bn(depths[-1]) if shortcut else 0)

    total = 27 * 32 + bn(32) + 9 * 32 * 64 + bn(64)        # entry stem
    total += block(64, (128,) * 3, True) + block(128, (256,) * 3, True)
    total += block(256, (728,) * 3, True)                    # entry flow
    total += 16 * block(728, (728,) * 3, False)              # middle flow
    total += block(728, (728, 1024, 1024), True)             # exit flow
    total += block(1024, (1536, 1536, 2048), False)
    return total


def test_xception_architecture_and_one_forward():
    model = backbones.build_backbone("xception")
    assert model.count_params() == _xception65_param_count()  # ~38.05M
    # Max-pooling replaced by strided separable convs; OS16 from rate 2 in the exit flow.
    kinds = {type(layer).__name__ for layer in model.layers}
    assert not any("Pool" in kind for kind in kinds), kinds
    assert sum(1 for layer in model.layers
               if layer.name.startswith("middle_block") and layer.name.endswith("_add")) == 16
    assert model.get_layer("exit_block2_sepconv1_depthwise").dilation_rate == (2, 2)
    assert model.get_layer("exit_block1_sepconv3_depthwise").strides == (1, 1)
    assert model.get_layer("entry_block3_sepconv3_depthwise").strides == (2, 2)
    # BN + ReLU after each depthwise conv (DeepLab v3+).
    assert model.get_layer("middle_block1_sepconv1_depthwise_relu") is not None

    features = model(_image(64, 64))
    assert tuple(features["low"].shape) == (1, 16, 16, 256)
    assert tuple(features["high"].shape) == (1, 4, 4, 2048)
    assert np.all(np.isfinite(features["high"]))


def test_unknown_name_and_imagenet_are_refused():
    with pytest.raises(ValueError, match="Unknown backbone 'resnet'"):
        backbones.build_backbone("resnet")
    with pytest.raises(ValueError, match="nothing may be downloaded"):
        backbones.build_backbone("small", weights="imagenet")


def test_weight_file_round_trip(tmp_path):
    path = tmp_path / "small.weights.h5"
    source = backbones.build_backbone("small", widths=(8, 16, 24, 32))
    # Change BN moving statistics too, so that non-trainable weights are checked.
    source(_image(32, 32, batch=2), training=True)
    source.save_weights(path)
    loaded = backbones.build_backbone("small", weights=str(path), widths=(8, 16, 24, 32))
    fresh = backbones.build_backbone("small", widths=(8, 16, 24, 32))
    x = _image(48, 40, seed=1)
    for key in ("low", "high"):
        np.testing.assert_array_equal(np.asarray(loaded(x)[key]), np.asarray(source(x)[key]))
        assert not np.allclose(np.asarray(fresh(x)[key]), np.asarray(source(x)[key]))


def test_weight_file_errors_name_the_file(tmp_path):
    path = tmp_path / "small.weights.h5"
    backbones.build_backbone("small", widths=(8, 16, 24, 32)).save_weights(path)
    # Same layer count, other shapes.
    with pytest.raises(ValueError, match=r"small\.weights\.h5.*do not match"):
        backbones.build_backbone("small", weights=path, widths=(8, 16, 24, 48))
    # Fewer and more weights than the file holds (Keras alone ignores extra ones).
    for blocks in [(1, 1, 0), (1, 1, 2)]:
        with pytest.raises(ValueError, match=r"small\.weights\.h5: holds 50 weight arrays"):
            backbones.build_backbone("small", weights=path, widths=(8, 16, 24, 32),
                                     blocks=blocks)
    with pytest.raises(ValueError, match="small.weights.h5"):
        backbones.build_backbone("mobilenet_v2", weights=path)
    missing = tmp_path / "missing.weights.h5"
    with pytest.raises(FileNotFoundError,
                       match="missing.weights.h5: backbone weight file not found"):
        backbones.build_backbone("small", weights=missing)
    wrong_kind = tmp_path / "model.h5"
    wrong_kind.write_bytes(b"not a weight file")
    with pytest.raises(ValueError, match=r"model\.h5: a backbone weight file must be"):
        backbones.build_backbone("small", weights=wrong_kind)
    corrupt = tmp_path / "corrupt.weights.h5"
    corrupt.write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match=r"corrupt\.weights\.h5: cannot be read"):
        backbones.build_backbone("small", weights=corrupt)


def test_weight_file_reaches_the_stage_that_training_builds(tmp_path):
    # A stage builds its encoder inside Keras' symbolic build (a StatelessScope), where
    # load_weights' assignments used to be dropped: the file was read, the weights not.
    from configs import synthetic_cpu
    from popnet_tf.models import popnet

    config = synthetic_cpu.get_config("smoke")
    kwargs = dict(config.model.backbone_kwargs.to_dict())
    source = backbones.build_backbone(config.model.backbone, **kwargs)
    source(_image(32, 32, batch=2), training=True)  # moving statistics differ from fresh
    path = tmp_path / "small.weights.h5"
    source.save_weights(path)
    config.model.backbone_weights = str(path)
    for stage, previous in ((1, None), (2, "stage1")):
        model = popnet.build_stage(config, stage, previous=previous and stage1)
        popnet.build_variables(model, stage, 32)
        for loaded, saved in zip(model.encoder.backbone.weights, source.weights):
            np.testing.assert_array_equal(np.asarray(loaded), np.asarray(saved), err_msg=loaded.path)
        if stage == 1:
            stage1 = model
