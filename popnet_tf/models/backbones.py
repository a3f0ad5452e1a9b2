"""Backbones of the DeepLab v3+ encoder: image -> {"low": stride 4, "high": stride 16}.

SPEC §6: each stage's encoder is DeepLab v3+ with an aligned-Xception backbone at
output stride 16; a small backbone is offered for CPU runs. Every backbone here
is a functional `keras.Model` that maps a PREPROCESSED image (float in [-1, 1],
`[B, H, W, 3]`) to a dict

    {"low":  [B, ceil(H/4),  ceil(W/4),  C_low],   # decoder skip features
     "high": [B, ceil(H/16), ceil(W/16), C_high]}  # fed to ASPP

for any H, W (dynamic shapes, sizes not divisible by 16 included; "mobilenet_v2"
rounds odd sizes down instead). Strided
convolutions pad explicitly and symmetrically (TF DeepLab's `fixed_padding`), so a
feature at index i sits over input pixel stride * i for every input size ("aligned").

Names (`build_backbone(name)`):
- "xception": aligned Xception-65 of DeepLab v3+ (Chen et al., ECCV 2018, §3.3 and
  the reference code `research/deeplab/core/xception.py`): entry flow, 16 middle-flow
  blocks, exit flow; every max-pooling replaced by a strided separable conv; BN and
  ReLU after each depthwise conv; output stride 16 by running the exit flow at stride
  1 with atrous rate 2 after the first exit block. ~38.1M parameters, 2048 channels.
- "small": a compact ResNet-style stack of plain 3x3 convs with BatchNorm for CPU
  runs (chosen over MobileNetV2 because depthwise convs are slow on CPU: see
  `_build_small`), ~0.5M parameters, 128 channels.
- "mobilenet_v2": `keras.applications.MobileNetV2` (random initialisation), taken at
  its stride-4 and stride-16 blocks.

No weights are ever downloaded (SPEC §7); `weights=PATH` loads a user's
`.weights.h5` file saved from the same backbone (`model.save_weights(PATH)`).

Example:
    >>> backbone = build_backbone("small")
    >>> features = backbone(np.zeros((1, 100, 60, 3), "float32"))
    >>> features["low"].shape, features["high"].shape
    (TensorShape([1, 25, 15, 32]), TensorShape([1, 7, 4, 128]))
"""

from __future__ import annotations

import os
import warnings

import h5py
import keras

BACKBONE_NAMES = ("xception", "small", "mobilenet_v2")

# Aligned Xception-65 (DeepLab v3+ reference code, `xception_65`): per block the
# depths of its three separable convs, the stride of the last one and the skip type.
_XCEPTION_ENTRY_FLOW = (
    ((128, 128, 128), 2, "conv"),
    ((256, 256, 256), 2, "conv"),   # "low" = output of this block's 2nd conv (stride 4)
    ((728, 728, 728), 2, "conv"),   # -> stride 16
)
_XCEPTION_MIDDLE_DEPTHS = (728, 728, 728)  # skip "sum" (identity)
_XCEPTION_EXIT_FLOW = (
    # The reference's stride-2 exit block runs at stride 1 for output stride 16, so
    # every later conv is dilated by 2 instead (atrous rate 2).
    ((728, 1024, 1024), 1, "conv"),
    ((1536, 1536, 2048), 1, "none"),
)


def build_backbone(name, *, input_shape=(None, None, 3), weights=None, **kwargs):
    """Builds a backbone: preprocessed image -> {"low": stride 4, "high": stride 16}.

    Args:
        name: one of `BACKBONE_NAMES`: "xception" (DeepLab v3+ aligned Xception-65,
            output stride 16), "small" (CPU), "mobilenet_v2".
        input_shape: `(H, W, 3)`; `None` sizes give a model for any image size.
        weights: None (random initialisation) or the path of a `.weights.h5` file
            saved with `save_weights` from a backbone built with the same name and
            arguments. Nothing is downloaded.
        **kwargs: per backbone: "xception": `middle_blocks=16`; "small":
            `widths=(16, 32, 64, 128)`, `blocks=(1, 1, 1)`; "mobilenet_v2":
            `alpha=0.35`. All accept `dtype` (a dtype policy for their layers; by
            default the global policy).

    Returns:
        A functional `keras.Model` mapping `[B, H, W, 3]` floats in [-1, 1] to
        `{"low": [B, ceil(H/4), ceil(W/4), C_low],
          "high": [B, ceil(H/16), ceil(W/16), C_high]}` (floor for "mobilenet_v2").

    Raises:
        ValueError: unknown name or arguments, or a weight file that does not fit.
        FileNotFoundError: `weights` names a file that does not exist.

    Example:
        >>> backbone = build_backbone("small", widths=(8, 16, 32, 64))
        >>> backbone(np.zeros((2, 64, 64, 3), "float32"))["high"].shape
        TensorShape([2, 4, 4, 64])
    """
    builders = {"xception": _build_xception, "small": _build_small,
                "mobilenet_v2": _build_mobilenet_v2}
    if name not in builders:
        raise ValueError(
            f"Unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)}.")
    if weights == "imagenet":
        raise ValueError(
            "weights='imagenet' is not supported: nothing may be downloaded here. "
            "Pass the path of a .weights.h5 file saved from the same backbone, or None.")
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(f"input_shape must be (H, W, 3), got {input_shape}.")
    model = builders[name](input_shape, **kwargs)
    if weights is not None:
        load_backbone_weights(model, weights, name=name)
    return model


def load_backbone_weights(model, path, *, name=None):
    """Loads a `.weights.h5` file into a backbone, with errors that name the file.

    Args:
        model: a backbone from `build_backbone`.
        path: str or path-like, a `.weights.h5` file written by `save_weights` from
            a backbone built with the same name and arguments.
        name: the backbone's name, used in error messages only.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a `.weights.h5` file, cannot be read, or its
            weights do not match the backbone (other architecture or widths).

    Example:
        >>> backbone = build_backbone("small")
        >>> load_backbone_weights(backbone, "stage2_backbone.weights.h5")
    """
    path = os.fspath(path)
    label = f"backbone {name!r}" if name else f"backbone {model.name!r}"
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: backbone weight file not found. Pass the path of a .weights.h5 "
            f"file saved with save_weights() from the same {label}.")
    if not path.endswith(".weights.h5"):
        raise ValueError(
            f"{path}: a backbone weight file must be a Keras '.weights.h5' file saved "
            f"with save_weights() from the same {label}.")
    try:
        stored = _count_stored_weights(path)
    except OSError as error:
        raise ValueError(f"{path}: cannot be read as a Keras .weights.h5 file ({error}); "
                         f"save it with save_weights() from the same {label}.") from error
    # Keras silently ignores weights that a file holds beyond the model's, so a file
    # from a bigger backbone would "load"; compare the counts first.
    if stored != len(model.weights):
        raise ValueError(
            f"{path}: holds {stored} weight arrays but {label} has {len(model.weights)}; "
            "the file was saved from a different backbone or with other arguments. "
            "Save it with save_weights() from a backbone built with the same name and "
            "arguments.")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.load_weights(path)
    except Exception as error:  # Keras raises ValueError/KeyError/OSError variously.
        raise ValueError(
            f"{path}: the weights in this file do not match {label} "
            f"({len(model.weights)} weights, {model.count_params():,} parameters); "
            "save them with save_weights() from a backbone built with the same name "
            f"and arguments. Keras said: {str(error)[:400]}") from error
    skipped = [str(w.message) for w in caught if "Skipping" in str(w.message)]
    if skipped:
        # Keras leaves the skipped layers freshly initialised: that is a mismatch too.
        raise ValueError(f"{path}: parts of the file did not match {label} and were "
                         f"skipped by Keras: {skipped[0]}")


def _count_stored_weights(path):
    """Number of weight arrays in a .weights.h5 file, optimizer state excluded."""
    count = 0

    def visit(name, obj):
        nonlocal count
        if isinstance(obj, h5py.Dataset) and not name.startswith("optimizer"):
            count += 1

    with h5py.File(path, "r") as file:
        file.visititems(visit)
    return count


# --------------------------------------------------------------------------------------
# Shared helpers.

def _layer_kwargs(dtype):
    return {} if dtype is None else {"dtype": dtype}


def _fixed_pad(x, kernel_size, rate, name, dtype):
    """Symmetric zero padding before a 'valid' strided conv (TF DeepLab fixed_padding).

    Keras' 'same' padding puts the odd extra pixel at the bottom/right, which shifts
    features by half a pixel per stride-2 step when H is even; padding both sides
    keeps feature i centred on input pixel stride * i.
    """
    effective = kernel_size + (kernel_size - 1) * (rate - 1)
    total = effective - 1
    begin = total // 2
    return keras.layers.ZeroPadding2D(
        ((begin, total - begin), (begin, total - begin)), name=name,
        **_layer_kwargs(dtype))(x)


def _conv_bn_relu(x, filters, stride, name, dtype, relu=True):
    """3x3 conv (explicitly padded when strided) + BN (+ ReLU)."""
    kw = _layer_kwargs(dtype)
    if stride > 1:
        x = _fixed_pad(x, 3, 1, f"{name}_pad", dtype)
    x = keras.layers.Conv2D(filters, 3, strides=stride,
                            padding="valid" if stride > 1 else "same",
                            use_bias=False, name=name, **kw)(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn", **kw)(x)
    if relu:
        x = keras.layers.ReLU(name=f"{name}_relu", **kw)(x)
    return x


# --------------------------------------------------------------------------------------
# Aligned Xception-65 (DeepLab v3+).

def _separable_conv(x, filters, stride, rate, relu_out, name, dtype):
    """Depthwise 3x3 (strided or atrous) + BN + ReLU, pointwise 1x1 + BN (+ ReLU).

    DeepLab v3+ §3.3: "extra batch normalization and ReLU activation are added after
    each 3x3 depthwise convolution"; a strided depthwise conv replaces max-pooling.
    """
    kw = _layer_kwargs(dtype)
    if stride > 1:
        x = _fixed_pad(x, 3, rate, f"{name}_pad", dtype)
    x = keras.layers.DepthwiseConv2D(
        3, strides=stride, dilation_rate=rate, padding="valid" if stride > 1 else "same",
        use_bias=False, name=f"{name}_depthwise", **kw)(x)
    x = keras.layers.BatchNormalization(name=f"{name}_depthwise_bn", **kw)(x)
    x = keras.layers.ReLU(name=f"{name}_depthwise_relu", **kw)(x)
    x = keras.layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_pointwise", **kw)(x)
    x = keras.layers.BatchNormalization(name=f"{name}_pointwise_bn", **kw)(x)
    if relu_out:
        x = keras.layers.ReLU(name=f"{name}_pointwise_relu", **kw)(x)
    return x


def _xception_block(x, depths, stride, rate, skip, name, dtype):
    """One Xception module: 3 separable convs (stride on the last) plus a shortcut.

    As the reference `xception_module`: blocks with a shortcut are pre-activated
    (ReLU before each separable conv); the last exit block has no shortcut and its
    separable convs end in ReLU instead. Returns (output, output of the 2nd conv).
    """
    kw = _layer_kwargs(dtype)
    pre_activation = skip != "none"
    residual = x
    second = None
    for i, depth in enumerate(depths):
        unit = f"{name}_sepconv{i + 1}"
        if pre_activation:
            residual = keras.layers.ReLU(name=f"{unit}_preact", **kw)(residual)
        residual = _separable_conv(residual, depth, stride if i == len(depths) - 1 else 1,
                                   rate, relu_out=not pre_activation, name=unit,
                                   dtype=dtype)
        if i == 1:
            second = residual
    if skip == "conv":
        # 1x1 stride-2 'valid' conv samples pixels 0, 2, 4, ..., the same centres as
        # the explicitly padded 3x3 stride-2 path, and gives ceil(H / 2) too.
        shortcut = keras.layers.Conv2D(depths[-1], 1, strides=stride, use_bias=False,
                                       name=f"{name}_shortcut", **kw)(x)
        shortcut = keras.layers.BatchNormalization(name=f"{name}_shortcut_bn", **kw)(shortcut)
        residual = keras.layers.Add(name=f"{name}_add", **kw)([residual, shortcut])
    elif skip == "sum":
        residual = keras.layers.Add(name=f"{name}_add", **kw)([residual, x])
    return residual, second


def _build_xception(input_shape, *, middle_blocks=16, dtype=None):
    """Aligned Xception-65 at output stride 16 (DeepLab v3+)."""
    if middle_blocks < 1:
        raise ValueError(f"xception: middle_blocks must be >= 1, got {middle_blocks}.")
    image = keras.Input(input_shape, name="image")
    # Entry flow stem: 3x3 conv 32 stride 2, 3x3 conv 64.
    x = _conv_bn_relu(image, 32, 2, "entry_conv1", dtype)
    x = _conv_bn_relu(x, 64, 1, "entry_conv2", dtype)
    low = None
    for i, (depths, stride, skip) in enumerate(_XCEPTION_ENTRY_FLOW):
        x, second = _xception_block(x, depths, stride, 1, skip, f"entry_block{i + 1}", dtype)
        if i == 1:
            # Reference: 'entry_flow/block2/unit_1/xception_module/
            # separable_conv2_pointwise', 256 channels at stride 4.
            low = second
    for i in range(middle_blocks):
        x, _ = _xception_block(x, _XCEPTION_MIDDLE_DEPTHS, 1, 1, "sum",
                               f"middle_block{i + 1}", dtype)
    # Exit flow at stride 16: the first block keeps rate 1 (its stride became 1),
    # the second is atrous with rate 2, as the reference's output_stride logic does.
    for i, (depths, stride, skip) in enumerate(_XCEPTION_EXIT_FLOW):
        x, _ = _xception_block(x, depths, stride, 1 if i == 0 else 2, skip,
                               f"exit_block{i + 1}", dtype)
    return keras.Model(image, {"low": low, "high": x}, name="aligned_xception")


# --------------------------------------------------------------------------------------
# Small CPU backbone.

def _basic_block(x, filters, name, dtype):
    """ResNet basic block: 2 x (3x3 conv + BN), identity shortcut, ReLU."""
    kw = _layer_kwargs(dtype)
    y = _conv_bn_relu(x, filters, 1, f"{name}_conv1", dtype)
    y = _conv_bn_relu(y, filters, 1, f"{name}_conv2", dtype, relu=False)
    y = keras.layers.Add(name=f"{name}_add", **kw)([x, y])
    return keras.layers.ReLU(name=f"{name}_relu", **kw)(y)


def _build_small(input_shape, *, widths=(16, 32, 64, 128), blocks=(1, 1, 1), dtype=None):
    """Compact ResNet-style backbone of regular 3x3 convs for CPU runs.

    stem: conv s2 (widths[0]), conv s2 (widths[1]) -> blocks[0] basic blocks = "low"
    (stride 4); conv s2 (widths[2]) + blocks[1] blocks (stride 8); conv s2
    (widths[3]) + blocks[2] blocks = "high" (stride 16).

    Why this and not MobileNetV2: measured on the 2-core CPU at 128x128, batch 4,
    forward+backward: this stack 53 ms (0.49M parameters), MobileNetV2 alpha 0.35
    80 ms (0.09M), alpha 0.5 112 ms; depthwise convs are slow on CPU. Plain convs
    with BatchNorm (momentum 0.99) also train quickly from random initialisation.
    """
    if len(widths) != 4 or len(blocks) != 3:
        raise ValueError(f"small: widths needs 4 entries and blocks 3, got {widths}, {blocks}.")
    image = keras.Input(input_shape, name="image")
    x = _conv_bn_relu(image, widths[0], 2, "stem_conv1", dtype)
    x = _conv_bn_relu(x, widths[1], 2, "stem_conv2", dtype)
    for j in range(blocks[0]):
        x = _basic_block(x, widths[1], f"stage1_block{j + 1}", dtype)
    low = x
    for stage in (2, 3):
        x = _conv_bn_relu(x, widths[stage], 2, f"stage{stage}_down", dtype)
        for j in range(blocks[stage - 1]):
            x = _basic_block(x, widths[stage], f"stage{stage}_block{j + 1}", dtype)
    return keras.Model(image, {"low": low, "high": x}, name="small_backbone")


# --------------------------------------------------------------------------------------
# MobileNetV2 from keras.applications.

def _build_mobilenet_v2(input_shape, *, alpha=0.35, dtype=None):
    """keras.applications.MobileNetV2 (weights=None) cut at stride 4 and 16.

    "low" = block_2_add (stride 4), "high" = block_12_add (last stride-16 block);
    layers after block 12 are not part of the returned model. Its padding follows
    the input size, so it is not "aligned" like the other two, and for odd sizes its
    features are floor(H / stride) rather than ceil(H / stride).
    """
    # keras.applications takes no dtype: its layers follow the global policy, so set
    # it for the duration of the build.
    previous = keras.config.dtype_policy()
    if dtype is not None:
        keras.config.set_dtype_policy(dtype)
    try:
        base = keras.applications.MobileNetV2(
            input_shape=input_shape, alpha=alpha, include_top=False, weights=None)
    finally:
        keras.config.set_dtype_policy(previous)
    # keras.applications uses BN momentum 0.999, tuned for long ImageNet runs; with
    # 0.99 the moving statistics follow a short from-scratch run.
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.99
    return keras.Model(base.input, {"low": base.get_layer("block_2_add").output,
                                    "high": base.get_layer("block_12_add").output},
                       name="mobilenet_v2_backbone")
