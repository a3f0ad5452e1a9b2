"""popnet_tf: one-shot human parsing (POPNet, He et al., AAAI 2021) in Keras 3 / TensorFlow."""

__version__ = "0.1.0"
