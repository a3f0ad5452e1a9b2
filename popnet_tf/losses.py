"""Losses: pixel-wise cross-entropy with an ignore label, and the DML loss (Eq. 5).

Example:
    >>> loss_sum, count = masked_cross_entropy(labels, logits)    # [B], [B]
    >>> loss = dual_metric_loss(labels, agm_logits, ncm_logits, beta=0.7)["total"]  # [B]
"""

from __future__ import annotations

import tensorflow as tf

from popnet_tf.classes import IGNORE_LABEL


def masked_cross_entropy(labels: tf.Tensor, logits: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Sum of pixel cross-entropies over labelled pixels, and their count.

    Args:
        labels: [B, H, W] int, class ids in 0..C-1 or IGNORE_LABEL.
        logits: [B, H, W, C] float; absent classes carry a large negative logit.
    Returns:
        (loss_sum [B] float32, num_labelled [B] float32): per-sample sums so the
        caller can average over a global batch under tf.distribute.
    """
    logits = tf.cast(logits, tf.float32)  # losses stay float32 under mixed precision
    labels = tf.cast(labels, tf.int32)
    valid = tf.not_equal(labels, IGNORE_LABEL)
    safe_labels = tf.where(valid, labels, tf.zeros_like(labels))
    per_pixel = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe_labels, logits=logits)
    valid_f = tf.cast(valid, tf.float32)
    return (tf.reduce_sum(per_pixel * valid_f, axis=[1, 2]),
            tf.reduce_sum(valid_f, axis=[1, 2]))


def mean_cross_entropy(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Per-sample mean cross-entropy over labelled pixels: [B] float32 (0 if none)."""
    loss_sum, count = masked_cross_entropy(labels, logits)
    return loss_sum / tf.maximum(count, 1.0)


def dual_metric_loss(labels, agm_logits, ncm_logits, beta) -> dict[str, tf.Tensor]:
    """Eq. 5: L = beta * CE(AGM) + (1 - beta) * CE(NCM), per sample.

    Returns a dict of [B] float32 tensors: `total`, `agm`, `ncm`. The caller
    averages over the (global) batch.
    """
    beta = tf.cast(beta, tf.float32)
    agm = mean_cross_entropy(labels, agm_logits)
    ncm = mean_cross_entropy(labels, ncm_logits)
    return {"total": beta * agm + (1.0 - beta) * ncm, "agm": agm, "ncm": ncm}
