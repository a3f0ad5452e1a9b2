"""Baseline stage models (SG-One, PANet, AMP, Fine-tune) and the baseline / ablation
configs: shapes, a training step, config round trip, checkpoints, and the methods'
maths against NumPy references."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from configs import synthetic_cpu
from configs.ablations import agm, dml, dml_ws, dml_ws_kim, dml_ws_kim_dp, ncm
from configs.baselines import amp, finetune, panet, sgone
from popnet_tf import train_lib
from popnet_tf.models import baselines, popnet

BASELINE_CONFIGS = {"sgone": sgone, "panet": panet, "amp": amp, "finetune": finetune}


def _model(method, hidden_convs=0):
    config = BASELINE_CONFIGS[method].get_config("smoke")
    config.model.agm_hidden_convs = hidden_convs
    model = popnet.build_stage(config, 3)
    popnet.build_variables(model, 3, 40)
    return config, model


def _batch(size=40, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    mask = np.zeros((batch, size, size), np.int32)
    mask[:, : size // 2] = 3
    mask[:, size // 2:, : size // 4] = 10
    mask[:, -2:] = 255
    return {"query_image": image, "support_image": image[::-1].copy(), "support_mask": mask,
            "query_mask": mask[::-1].copy()}


@pytest.mark.parametrize("method,hidden", [("sgone", 0), ("sgone", 1), ("panet", 0),
                                           ("amp", 0), ("finetune", 0)])
def test_outputs_train_step_and_config(method, hidden):
    config, model = _model(method, hidden)
    batch = _batch()
    out = model(batch, training=False)
    assert out["logits"].shape == (2, 40, 40, 12) and out["probs"].shape == (2, 40, 40, 12)
    probs = out["probs"].numpy()
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    absent = [c for c in range(1, 12) if c not in (3, 10)]
    assert probs[..., absent].max() < 1e-6          # only the support's classes compete
    # One optimizer step with the training loop's loss (eager: tracing the step costs
    # more than it tests): finite loss, weights move.
    optimizer = train_lib.make_optimizer(config, 10)
    before = [v.numpy().copy() for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        loss, logs = train_lib._oneshot_loss(model, batch, 2, tf.constant(0.5), tf.constant(False))
    optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    assert np.isfinite(float(loss))
    assert ("extra_loss" in logs) == (method == "panet")
    assert any(not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables))
    # get_config round trip.
    clone = type(model).from_config(model.get_config())
    assert clone.get_config() == model.get_config()


@pytest.mark.parametrize("method", ["sgone", "panet", "amp", "finetune"])
def test_checkpoint_restores_every_variable(method, tmp_path):
    keras.utils.set_random_seed(0)
    _, saved = _model(method)
    saved(_batch(), training=True)  # AMP: marks classes as seen
    path = tf.train.Checkpoint(model=saved).save(os.path.join(tmp_path, "ckpt"))
    keras.utils.set_random_seed(1)
    _, fresh = _model(method)
    tf.train.Checkpoint(model=fresh).restore(path).assert_existing_objects_matched()
    assert len(fresh.weights) == len(saved.weights)
    for a, b in zip(saved.weights, fresh.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def _normalise(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def test_sgone_guidance_is_eq3_without_residual():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(2, 5, 5, 8)).astype(np.float32)
    maps = rng.uniform(-1, 1, (2, 5, 5, 4)).astype(np.float32)
    presence = np.array([[0, 1, 1, 0], [0, 0, 1, 1]], np.float32)
    layer = baselines.SimilarityGuidance(8)
    logits = layer(feats, maps, presence).numpy()
    wp, bp = layer.phi.kernel.numpy().reshape(8), layer.phi.bias.numpy()[0]
    wo, bo = layer.omega.kernel.numpy().reshape(8), layer.omega.bias.numpy()[0]
    for b in range(2):
        present = np.flatnonzero(presence[b])
        phi = {c: (maps[b, ..., c:c + 1] * feats[b]) @ wp + bp for c in present}
        omega = [(maps[b, ..., c:c + 1] * feats[b]) @ wo + bo for c in present]
        np.testing.assert_allclose(logits[b, ..., 0], np.mean(omega, axis=0), rtol=1e-5, atol=1e-5)
        for c in range(1, 4):
            if c in phi:
                np.testing.assert_allclose(logits[b, ..., c], phi[c], rtol=1e-5, atol=1e-5)
            else:
                assert np.all(logits[b, ..., c] <= -1e3)


def test_panet_background_prototype_numpy():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(2, 6, 6, 4)).astype(np.float32)
    labels = rng.choice([0, 1, 2, 255], size=(2, 6, 6)).astype(np.int32)
    labels[1] = np.where(labels[1] == 2, 0, labels[1])  # sample 1: one way only
    presence = np.stack([[float(c > 0 and (labels[b] == c).any()) for c in range(3)] for b in range(2)])
    got = baselines.panet_background_prototype(feats, labels, presence, 3).numpy()
    for b in range(2):
        ways = [feats[b][(labels[b] != c) & (labels[b] != 255)].mean(0)
                for c in range(1, 3) if presence[b, c]]
        np.testing.assert_allclose(got[b], np.mean(ways, axis=0), rtol=1e-5, atol=1e-6)


def test_panet_alignment_loss_numpy():
    rng = np.random.default_rng(2)
    size, k, num_classes, scale = 6, 4, 4, 20.0
    q_feats = rng.normal(size=(2, size, size, k)).astype(np.float32)
    s_feats = rng.normal(size=(2, size, size, k)).astype(np.float32)
    q_logits = rng.normal(size=(2, size, size, num_classes)).astype(np.float32)
    q_logits[0, ..., 3] -= 100.0      # sample 0: class 3 never predicted -> its way skipped
    labels = rng.choice([0, 1, 3, 255], size=(2, size, size), p=[.4, .3, .2, .1]).astype(np.int32)
    presence = np.stack([[float(c > 0 and (labels[b] == c).any()) for c in range(num_classes)]
                         for b in range(2)])
    got = baselines.panet_alignment_loss(q_feats, q_logits, s_feats, labels, presence, scale).numpy()
    for b in range(2):
        pred = q_logits[b].argmax(-1)
        protos = [q_feats[b][pred == c].sum(0) / ((pred == c).sum() + 1e-5) for c in range(num_classes)]
        total, ways = 0.0, [c for c in range(1, num_classes) if presence[b, c]]
        for c in ways:
            if not (pred == c).any():
                continue
            f = _normalise(s_feats[b])
            fg = scale * f @ _normalise(protos[c])
            bg = scale * f @ _normalise(protos[0])
            valid = labels[b] != 255
            target = labels[b] == c
            log_p_fg = fg - np.logaddexp(fg, bg)
            log_p_bg = bg - np.logaddexp(fg, bg)
            ce = -np.where(target, log_p_fg, log_p_bg)
            total += ce[valid].mean()
        np.testing.assert_allclose(got[b], total / len(ways), rtol=1e-4)
    assert got[0] > 0


def test_amp_imprinting_numpy():
    rng = np.random.default_rng(3)
    dims, num_classes, alpha = (3, 5), 4, 0.3
    layer = baselines.MaskedProxyImprinting(num_classes, dims, alpha=alpha)
    layer.build()
    w = [rng.normal(size=(num_classes, d)).astype(np.float32) for d in dims]
    for var, value in zip(layer.class_weights, w):
        var.assign(value)
    seen = np.array([1, 1, 0, 1], np.float32)
    layer.seen.assign(seen)
    proxies = rng.normal(size=(2, num_classes, 8)).astype(np.float32)
    presence = np.array([[1, 1, 1, 0], [1, 0, 1, 1]], np.float32)
    got = layer.imprint(proxies, presence, training=False).numpy()
    for b in range(2):
        for c in range(num_classes):
            parts, start = [], 0
            for r, d in enumerate(dims):
                w_hat = _normalise(w[r][c])
                p_hat = _normalise(proxies[b, c, start:start + d])
                start += d
                if not presence[b, c]:
                    parts.append(w_hat)
                elif seen[c]:
                    parts.append(_normalise((1 - alpha) * w_hat + alpha * p_hat))
                else:
                    parts.append(p_hat)
            np.testing.assert_allclose(got[b, c], np.concatenate(parts), rtol=1e-5, atol=1e-6)
    # Logits: τ · Σ_r cos, absent classes masked.
    feats = rng.normal(size=(2, 3, 3, 8)).astype(np.float32)
    logits = layer.logits(feats, got, presence).numpy()
    tau = float(layer.temperature.numpy())
    expected = tau * (np.einsum("bhwd,bcd->bhwc", _normalise(feats[..., :3]), _normalise(got[..., :3]))
                      + np.einsum("bhwd,bcd->bhwc", _normalise(feats[..., 3:]), _normalise(got[..., 3:])))
    np.testing.assert_allclose(logits[0, ..., :3], expected[0, ..., :3], rtol=1e-4, atol=1e-4)
    assert np.all(logits[0, ..., 3] <= -1e3) and np.all(logits[1, ..., 1] <= -1e3)
    # Training marks the present classes as seen; inference leaves `seen` alone.
    layer.imprint(proxies, presence, training=True)
    np.testing.assert_array_equal(layer.seen.numpy(), [1, 1, 1, 1])


def test_amp_encoder_pyramid_matches_encoder():
    _, model = _model("amp")
    images = _batch(size=44)["query_image"]
    fine, coarse = baselines.encoder_pyramid(model.encoder, images)
    np.testing.assert_allclose(fine.numpy(), model.encoder(images).numpy(), rtol=1e-5, atol=1e-5)
    assert coarse.shape[1:3] == (3, 3)  # stride 16 of 44


def test_finetune_variables_are_last_two_convs_and_classifier():
    _, model = _model("finetune")
    chosen = {id(v) for v in model.finetune_variables()}
    decoder = model.encoder.decoder
    expected = {id(v) for layer in (*decoder[-2:], model.classifier) for v in layer.trainable_variables}
    assert chosen == expected and len(decoder) == 2
    assert not chosen & {id(v) for v in model.encoder.backbone.trainable_variables}


def test_baseline_with_kim_refused():
    config = panet.get_config("smoke")
    config.model.kim = True
    with pytest.raises(ValueError, match="single-stage"):
        popnet.build_stage(config, 3)


def _flat(config):
    out = {}

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                out[f"{prefix}{k}"] = v
    walk("", config.to_dict())
    return out


def _diff(config, reference):
    a, b = _flat(config), _flat(reference)
    assert a.keys() == b.keys()
    return {k: a[k] for k in a if a[k] != b[k]}


@pytest.mark.parametrize("variant", [None, "smoke"])
def test_ablation_configs_differ_in_exactly_the_intended_keys(variant):
    ref = synthetic_cpu.get_config(variant)
    single = {"model.kim": False, "model.dynamic_prototypes": False}
    assert _diff(agm.get_config(variant), ref) == {
        **single, "train.beta_schedule": "constant", "train.beta_constant": 1.0,
        "model.prediction_head": "agm", "eval.head": "agm"}
    assert _diff(ncm.get_config(variant), ref) == {
        **single, "train.beta_schedule": "constant", "train.beta_constant": 0.0}
    assert _diff(dml.get_config(variant), ref) == {
        **single, "train.beta_schedule": "constant"}  # beta_constant 0.5 is the default
    assert ref.train.beta_constant == 0.5
    assert _diff(dml_ws.get_config(variant), ref) == single
    assert _diff(dml_ws_kim.get_config(variant), ref) == {"model.dynamic_prototypes": False}
    assert _diff(dml_ws_kim_dp.get_config(variant), ref) == {}


def test_baseline_configs_differ_in_exactly_the_intended_keys():
    ref = synthetic_cpu.get_config()
    for method, module in BASELINE_CONFIGS.items():
        assert _diff(module.get_config(), ref) == {
            "model.method": method, "model.kim": False, "model.dynamic_prototypes": False,
            "eval.head": "model"}
    paper_config = panet.get_config("paper")
    assert paper_config.model.backbone == "xception" and paper_config.model.method == "panet"


@pytest.mark.parametrize("method", ["sgone", "panet", "amp", "finetune"])
def test_train_step_under_mixed_bfloat16(method):
    """The CPU config trains in bfloat16 where the CPU has it (train.mixed_precision=auto):
    every baseline runs a training step with a finite loss under that policy (AMP's float32
    imprinting weights were once read as bfloat16 and failed to mix with its proxies)."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        config, model = _model(method)
        with tf.GradientTape() as tape:
            loss, _ = train_lib._oneshot_loss(model, _batch(), 2, tf.constant(0.5), tf.constant(False))
        grads = tape.gradient(loss, model.trainable_variables)
        assert np.isfinite(float(loss))
        assert all(g is None or np.all(np.isfinite(tf.cast(g, tf.float32).numpy())) for g in grads)
    finally:
        keras.mixed_precision.set_global_policy("float32")
