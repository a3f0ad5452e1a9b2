"""Stage models: outputs, checkpoint completeness, base vs novel prototypes at test."""

import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from configs import synthetic_cpu
from configs.baselines import amp, finetune, panet, sgone
from popnet_tf.models import popnet


def _three_stages(config, size):
    previous, models = None, []
    for stage in (1, 2, 3):
        model = popnet.build_stage(config, stage, previous=previous)
        popnet.build_variables(model, stage, size)
        models.append(model)
        previous = model
    return models


def _config():
    config = synthetic_cpu.get_config("smoke")
    config.model.agm_hidden_convs = 1  # exercise the AGM trunk's list of convs too
    return config


def test_outputs_and_shapes():
    config = _config()
    _, _, s3 = _three_stages(config, 48)
    batch = popnet.dummy_batch(3, 40, batch=2)
    out = s3(batch, training=False)
    assert out["ncm_probs"].shape == (2, 40, 40, 12)
    assert out["prototypes"].shape == (2, 12, config.model.filters)
    np.testing.assert_allclose(out["ncm_probs"].numpy().sum(-1), 1.0, atol=1e-5)
    # only background and class 1 are present: every other class has probability ~0
    assert out["ncm_probs"].numpy()[..., 2:].max() < 1e-3


def test_gate_by_foreground_numpy_reference():
    """P(bg) = 1 - f(1 - p_bg), P(c) = f p_c, written out in NumPy; f = 1 changes nothing,
    f = 0 is all background, and the result stays a distribution."""
    from popnet_tf.models.stages import gate_by_foreground

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7, 4)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    f = rng.uniform(size=(2, 5, 7, 1)).astype(np.float32)
    f[0, 0, 0], f[0, 0, 1] = 1.0, 0.0
    expected = np.concatenate([1 - f * (1 - probs[..., :1]), f * probs[..., 1:]], -1)
    got = np.asarray(gate_by_foreground(probs, f))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(got[0, 0, 0], probs[0, 0, 0], atol=1e-7)
    np.testing.assert_array_equal(got[0, 0, 1], [1, 0, 0, 0])


def test_foreground_probability_is_stage_one():
    config = _config()
    s1, s2, s3 = _three_stages(config, 48)
    image = popnet.dummy_batch(3, 40, batch=2)["query_image"]
    expected = s1(image, training=False)["probs"].numpy()[..., 1:]
    for stage in (s2, s3):
        np.testing.assert_allclose(stage.foreground_probability(image).numpy(), expected, atol=1e-6)
    probs = s3({"query_image": image, "support_image": image,
                "support_mask": tf.ones((2, 40, 40), tf.int32)}, training=False)["ncm_probs"]
    gated = s3.foreground_gated(probs, image).numpy()
    np.testing.assert_allclose(gated[..., 1:], expected * probs.numpy()[..., 1:], atol=1e-6)
    # One pass for the gate: the features and stage 1's probability that the KIM chain
    # computes together equal each computed alone.
    for stage in (s2, s3):
        features, human = stage.features_and_foreground(image)
        np.testing.assert_allclose(human.numpy(), expected, atol=1e-6)
        np.testing.assert_allclose(features.numpy(),
                                   stage.infused_features(image, training=False).numpy(), atol=1e-6)
    config.model.kim = False  # the ablations without KIM have no previous stages
    lone = popnet.build_stage(config, 3)
    with pytest.raises(ValueError, match="foreground gate needs stage 1"):
        lone.foreground_probability(image)
    with pytest.raises(ValueError, match="foreground gate needs stage 1"):
        lone.features_and_foreground(image)


def test_checkpoint_restores_every_variable(tmp_path):
    """tf.train.Checkpoint must hold every variable of the three stages (a list of
    layers filled after assignment once escaped it)."""
    config = _config()
    keras.utils.set_random_seed(0)
    saved = _three_stages(config, 48)[-1]
    path = tf.train.Checkpoint(model=saved).save(os.path.join(tmp_path, "ckpt"))
    keras.utils.set_random_seed(1)
    fresh = _three_stages(config, 48)[-1]
    tf.train.Checkpoint(model=fresh).restore(path).assert_existing_objects_matched()
    assert len(fresh.weights) == len(saved.weights)
    for a, b in zip(saved.weights, fresh.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_store_used_for_seen_classes_only():
    """At test, a class seen in training uses the blended store, an unseen (novel) one
    its static support prototype (SPEC §6)."""
    config = _config()
    config.model.kim = False
    model = popnet.build_stage(config, 3)
    popnet.build_variables(model, 3, 32)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    mask = np.zeros((1, 32, 32), np.int32)
    mask[:, :16] = 3          # class 3 will be "base" (seen)
    mask[:, 16:24] = 5        # class 5 stays "novel" (never seen)
    model.store.prototypes.assign(np.ones_like(model.store.prototypes.numpy()))
    seen = np.zeros(12, np.float32)
    seen[3] = 1
    model.store.seen.assign(seen)
    static, presence = model.support_prototypes(images, mask)
    blended = model.store(static, presence, training=False, use_dynamic=True).numpy()
    alpha = config.model.momentum
    np.testing.assert_allclose(blended[0, 3], (1 - alpha) * 1.0 + alpha * static.numpy()[0, 3], rtol=1e-5)
    np.testing.assert_allclose(blended[0, 5], static.numpy()[0, 5], rtol=1e-6)


def test_test_prototypes_follow_dynamic_prototypes_switch():
    """Evaluation and serving read the store only for a stage that uses DP: the
    ablation rows without DP keep static prototypes at test, even though the store
    was filled in training."""
    from popnet_tf import eval_lib

    config = _config()
    config.model.kim = False
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    mask = np.zeros((1, 32, 32), np.int32)
    mask[:, :16] = 3
    got = {}
    for dp in (True, False):
        config.model.dynamic_prototypes = dp
        model = popnet.build_stage(config, 3)
        popnet.build_variables(model, 3, 32)
        assert model.get_config()["dynamic_prototypes"] is dp
        model.store.prototypes.assign(np.full(model.store.prototypes.shape, 2.0, np.float32))
        model.store.seen.assign(np.ones(12, np.float32))
        static, presence = model.support_prototypes(images, mask)
        got[dp] = (eval_lib.test_prototypes(model, static, presence).numpy(), static.numpy())
        # A plain inference call predicts with the same prototypes as evaluation.
        out = model({"query_image": images, "support_image": images, "support_mask": mask},
                    training=False)
        np.testing.assert_allclose(out["prototypes"].numpy(), got[dp][0], rtol=1e-5, atol=1e-7)
    alpha = config.model.momentum
    np.testing.assert_allclose(got[True][0][0, 3], (1 - alpha) * 2.0 + alpha * got[True][1][0, 3],
                               rtol=1e-5)
    np.testing.assert_allclose(got[False][0], got[False][1], rtol=1e-6)


@pytest.mark.parametrize("module", [synthetic_cpu, sgone, panet, amp, finetune],
                         ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_stages_build_completely_without_keras_warnings(module):
    """Every sub-layer is built by the first call, the AGM too although NCM prediction
    never calls it: Keras warned "build() was called on layer 'stage2' ... unbuilt
    state" on every run, and a model built that way loads without those weights."""
    config = module.get_config("smoke")
    previous = None
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for stage in popnet.stages_needed(config, 3):
            model = popnet.build_stage(config, stage, previous=previous)
            popnet.build_variables(model, stage, 40)
            previous = model
    unbuilt = [layer.name for layer in model._flatten_layers(include_self=False)
               if not layer.built]
    assert not unbuilt


def test_agm_prediction_head_without_compute_agm():
    """A stage predicting with AGM (the "AGM" ablation row) scored or served with the NCM
    head (`--config.eval.head=ncm`, `export --head ncm`) asks `heads` for NCM only; its
    "probs" are still AGM's (it used to be a KeyError), and the NCM head comes back too."""
    from popnet_tf import serving

    config = _config()
    config.model.kim = False
    config.model.prediction_head = "agm"
    model = popnet.build_stage(config, 3)
    popnet.build_variables(model, 3, 32)
    rng = np.random.default_rng(2)
    images = rng.uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    mask = np.zeros((1, 32, 32), np.int32)
    mask[:, :16] = 3
    static, presence = model.support_prototypes(images, mask)
    features = model.infused_features(images)
    both = model.heads(features, static, presence, images, compute_agm=True)
    ncm_only = model.heads(features, static, presence, images, compute_agm=False)
    np.testing.assert_allclose(ncm_only["probs"], both["agm_probs"], atol=1e-6)
    np.testing.assert_allclose(ncm_only["ncm_probs"], both["ncm_probs"], atol=1e-6)
    served = serving.OneShotParser(model, 32, head="ncm").parse_images(
        images, images[0], mask[0])["probabilities"]
    np.testing.assert_allclose(served, np.asarray(both["ncm_probs"])[..., [0, 3]], atol=1e-5)
