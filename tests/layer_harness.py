"""One harness every layer test calls (STYLE §1): build from config, check the
output shape, count weights, round-trip through get_config and a .keras save."""

from __future__ import annotations

import os
import tempfile

import keras
import numpy as np


def run_layer_test(layer_cls, init_kwargs, inputs, expected_output_shape=None,
                   expected_num_trainable_weights=None,
                   expected_num_non_trainable_weights=None, call_kwargs=None,
                   atol=1e-5):
    """Checks the Keras layer contract and returns the layer's output.

    `inputs` is one array or a list of arrays, passed positionally to `call`. An
    element may itself be a list of arrays (a layer whose `call` takes a list, e.g.
    `KnowledgeInfusion`): pass `inputs=[[a, b]]`. Outputs may be a tensor, a
    tuple/list or a dict of tensors.
    """
    call_kwargs = call_kwargs or {}
    args = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    layer = layer_cls(**init_kwargs)
    output = layer(*args, **call_kwargs)
    first = output[0] if isinstance(output, (list, tuple)) else output
    if isinstance(output, dict):
        first = next(iter(output.values()))
    if expected_output_shape is not None:
        assert tuple(first.shape) == tuple(expected_output_shape), (first.shape, expected_output_shape)
    if expected_num_trainable_weights is not None:
        assert len(layer.trainable_weights) == expected_num_trainable_weights, layer.trainable_weights
    if expected_num_non_trainable_weights is not None:
        assert len(layer.non_trainable_weights) == expected_num_non_trainable_weights, layer.non_trainable_weights

    # get_config round trip: same config, same weights -> same output.
    config = layer.get_config()
    clone = layer_cls.from_config(config)
    clone(*args, **call_kwargs)
    assert clone.get_config() == config
    clone.set_weights(layer.get_weights())
    _assert_close(clone(*args, **call_kwargs), output, atol)

    # .keras save round trip inside a functional wrapper.
    keras_inputs = [_symbolic_input(a) for a in args]
    model_inputs = keras_inputs if len(args) > 1 else keras_inputs[0]  # as called below
    wrapper = keras.Model(model_inputs, layer(*keras_inputs, **call_kwargs))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "layer.keras")
        wrapper.save(path)
        reloaded = keras.models.load_model(path, custom_objects={layer_cls.__name__: layer_cls})
    _assert_close(reloaded(args if len(args) > 1 else args[0]), output, atol)
    return output


def _symbolic_input(a):
    """keras.Input matching an array, or a list of them for a list argument."""
    if isinstance(a, (list, tuple)):
        return [_symbolic_input(x) for x in a]
    return keras.Input(shape=np.shape(a)[1:], dtype=str(np.asarray(a).dtype))


def _assert_close(a, b, atol):
    if isinstance(a, dict):
        for key in a:
            _assert_close(a[key], b[key], atol)
    elif isinstance(a, (list, tuple)):
        for x, y in zip(a, b):
            _assert_close(x, y, atol)
    else:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-5)
