"""Eq. 5 and the masked cross-entropy against NumPy."""

import numpy as np

from popnet_tf import losses


def _np_ce(labels, logits):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    out = []
    for b in range(labels.shape[0]):
        valid = labels[b] != 255
        picked = np.take_along_axis(logp[b], np.where(valid, labels[b], 0)[..., None], -1)[..., 0]
        out.append(-(picked * valid).sum() / max(valid.sum(), 1))
    return np.array(out)


def test_mean_cross_entropy_ignores_255():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (2, 5, 6)).astype(np.int32)
    labels[0, :2] = 255
    logits = rng.normal(size=(2, 5, 6, 4)).astype(np.float32)
    got = losses.mean_cross_entropy(labels, logits).numpy()
    np.testing.assert_allclose(got, _np_ce(labels, logits), rtol=1e-5)


def test_all_ignored_gives_zero():
    labels = np.full((1, 3, 3), 255, np.int32)
    logits = np.zeros((1, 3, 3, 2), np.float32)
    assert losses.mean_cross_entropy(labels, logits).numpy()[0] == 0.0


def test_dual_metric_loss_weights():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, (2, 4, 4)).astype(np.int32)
    agm = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    ncm = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    for beta in (0.0, 0.3, 1.0):
        out = losses.dual_metric_loss(labels, agm, ncm, beta)
        expected = beta * _np_ce(labels, agm) + (1 - beta) * _np_ce(labels, ncm)
        np.testing.assert_allclose(out["total"].numpy(), expected, rtol=1e-5)
