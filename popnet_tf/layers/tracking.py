"""Checkpoint tracking of lists of sub-layers.

With Keras 3.15 on TensorFlow 2.21, `tf.train.Checkpoint` does not follow a list of
layers held by a Keras layer attribute: a checkpoint silently misses their weights
(tests/test_stages.py::test_checkpoint_restores_every_variable guards this). Giving
each item its own attribute makes it part of the checkpoint's object graph; Keras
deduplicates, so weights are not counted twice.

Example:
    >>> self.convs = track_layers(self, "conv", [Conv2D(8, 3), Conv2D(8, 3)])
"""

from __future__ import annotations


def track_layers(owner, prefix: str, layers: list) -> list:
    """Sets `owner.<prefix>_<i>` for each layer and returns the list unchanged."""
    for i, layer in enumerate(layers):
        setattr(owner, f"{prefix}_{i}", layer)
    return layers
