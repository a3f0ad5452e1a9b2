"""Training: β schedule, warmup, frozen stages, learning, resume, replicas, precision, save/load."""

import json
import copy
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from configs import synthetic_cpu
from popnet_tf import integrity, train_lib
from popnet_tf.models import popnet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(tmp_dir, **train):
    config = synthetic_cpu.get_config("smoke")
    config.data.dir = os.path.join(tmp_dir, "data")
    for key, value in train.items():
        setattr(config.train, key, value)
    return config


@pytest.fixture(scope="module")
def data_config(tmp_path_factory):
    """Smoke config with its synthetic dataset built once for the module."""
    tmp = str(tmp_path_factory.mktemp("train"))
    config = smoke_config(tmp)
    train_lib.ensure_dataset(config)
    return config


def test_beta_schedule_shift_and_constant():
    beta = tf.Variable(1.0)
    cb = train_lib.BetaSchedule(beta, epochs=4)
    got = []
    for epoch in range(4):
        cb.on_epoch_begin(epoch)
        got.append(float(beta.numpy()))
    np.testing.assert_allclose(got, [1.0, 0.75, 0.5, 0.25])
    cb = train_lib.BetaSchedule(beta, epochs=4, schedule="constant", constant=0.0)
    cb.on_epoch_begin(2)
    assert float(beta.numpy()) == 0.0
    with pytest.raises(ValueError):
        train_lib.BetaSchedule(beta, 4, schedule="linear")


def test_prototype_warmup():
    flag = tf.Variable(False)
    cb = train_lib.PrototypeWarmup(flag, warmup=2)
    states = []
    for epoch in range(4):
        cb.on_epoch_begin(epoch)
        states.append(bool(flag.numpy()))
    assert states == [False, False, True, True]
    off = train_lib.PrototypeWarmup(flag, warmup=0, enabled=False)
    off.on_epoch_begin(3)
    assert not bool(flag.numpy())


def _fixed_batch(config, stage, fold=1):
    data = train_lib.epoch_dataset(config, config.data.dir, stage, fold, epoch=0)
    return next(iter(data))


def test_crop_sizes_of_each_stage(data_config):
    """data.stage1_crop_size sizes stage 1's batches; 0 falls back to crop_size; the
    one-shot stages keep crop_size (k-way) or oneway_crop_size (one-way). The widths
    (data.stage1_crop_width, data.crop_width) make the crops rows x cols; stage 1 with
    its own size is square unless it has its own width."""
    config = smoke_config(os.path.dirname(data_config.data.dir))
    config.data.stage1_crop_size = 40
    assert _fixed_batch(config, 1)["image"].shape[1:3] == (40, 40)
    query = _fixed_batch(config, 2)["query_image"]
    assert query.shape[1:3] == (config.data.crop_size,) * 2
    config.data.stage1_crop_width = 32  # portrait: rows x cols
    assert _fixed_batch(config, 1)["image"].shape[1:3] == (40, 32)
    assert _fixed_batch(config, 1)["mask"].shape[1:3] == (40, 32)
    config.data.stage1_crop_size = 0
    config.data.stage1_crop_width = 0
    assert train_lib.crop_size(config, 1) == config.data.crop_size
    # data.crop_width: the k-way crop's columns, which stage 1 follows unless it has its own.
    config.data.crop_width = 40
    batch = _fixed_batch(config, 2)
    size = config.data.crop_size
    assert batch["query_image"].shape[1:3] == (size, 40)
    assert batch["support_mask"].shape[1:3] == (size, 40)
    assert train_lib.crop_size(config, 1) == (size, 40)
    config.data.stage1_crop_size = 44  # stage 1's own size: square unless its own width
    assert train_lib.crop_size(config, 1) == 44
    config.data.stage1_crop_width = 36
    assert train_lib.crop_size(config, 1) == (44, 36)
    config.data.stage1_crop_size = 0
    assert train_lib.crop_size(config, 1) == (size, 36)
    config.train.way = "oneway"
    assert train_lib.crop_size(config, 3) == config.data.oneway_crop_size


def test_support_crop_of_kway_episodes(data_config):
    """data.support_crop_size x support_crop_width crop the k-way supports on their own
    (whole-image supports with cropped queries) in the stages of support_crop_stages
    (default: 3 only); 0 keeps the query's crop, and stage 1 and one-way never use it."""
    config = smoke_config(os.path.dirname(data_config.data.dir))
    size = config.data.crop_size
    assert train_lib.support_crop_size(config, 3) is None            # default: the query's
    config.data.support_crop_size, config.data.support_crop_width = size + 16, size - 8
    assert train_lib.support_crop_size(config, 3) == (size + 16, size - 8)
    batch = _fixed_batch(config, 3)
    assert batch["query_image"].shape[1:3] == (size, size)
    assert batch["support_image"].shape[1:3] == (size + 16, size - 8)
    assert batch["support_mask"].shape[1:3] == (size + 16, size - 8)
    assert train_lib.support_crop_size(config, 1) is None
    assert train_lib.support_crop_size(config, 2) is None             # default: stage 3 only
    config.data.support_crop_stages = (2, 3)
    assert train_lib.support_crop_size(config, 2) == (size + 16, size - 8)
    config.data.support_crop_size = 0                                  # width alone: query rows
    assert train_lib.support_crop_size(config, 2) == (size, size - 8)
    config.data.support_crop_width = 0
    config.data.support_crop_size = size + 4                           # size alone: square
    assert train_lib.support_crop_size(config, 2) == size + 4
    config.train.way = "oneway"
    assert train_lib.support_crop_size(config, 3) is None
    config.data.support_crop_size = -1
    config.data.support_crop_stages = (1, 3)
    with pytest.raises(integrity.RunConfigError,
                       match=r"data.support_crop_size=-1.*data.support_crop_stages=\(1, 3\)"):
        train_lib.check_config(config)


def test_cache_decoded_reaches_both_dataset_builders(data_config, monkeypatch):
    """data.cache_decoded is passed to stage 1's and the one-shot stages' datasets."""
    from popnet_tf.data import episodes

    seen = {}

    def recorder(name, real):
        def wrapped(*args, **kwargs):
            seen[name] = kwargs["cache_decoded"]
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(episodes, "stage1_train_dataset",
                        recorder(1, episodes.stage1_train_dataset))
    monkeypatch.setattr(episodes, "train_episodes", recorder(2, episodes.train_episodes))
    config = smoke_config(os.path.dirname(data_config.data.dir))
    config.data.cache_decoded = True
    for stage in (1, 2):
        train_lib.epoch_dataset(config, config.data.dir, stage, 1, epoch=0)
    assert seen == {1: True, 2: True}
    config.data.cache_decoded = False
    train_lib.epoch_dataset(config, config.data.dir, 1, 1, epoch=0)
    assert seen[1] is False


def test_epoch_timer_reports_first_step_and_laps(monkeypatch):
    clock = iter([10.0, 12.5, 40.0, 41.0, 44.5])  # a second step reads no clock
    monkeypatch.setattr(train_lib.time, "perf_counter", lambda: next(clock))
    timer = train_lib._EpochTimer()   # 10.0
    timer.step_done()                 # 12.5: first step 2.5 s
    timer.step_done()                 # not the first: ignored
    timer.lap("training")             # 40.0
    timer.lap("checkpoint")           # 41.0
    timer.lap("validation")           # 44.5
    assert str(timer) == ("training 30.0 s, checkpoint 1.0 s, validation 3.5 s "
                          "(first step 2.5 s)")


def _stage_with_optimizer(config, stage, previous=None, steps=100):
    model = popnet.build_stage(config, stage, previous=previous)
    popnet.build_variables(model, stage, config.data.crop_size)
    optimizer = train_lib.make_optimizer(config, steps)
    return model, optimizer


def test_loss_falls_on_tiny_config(data_config):
    """A few dozen steps on one batch must at least halve the DML loss."""
    config = smoke_config(os.path.dirname(data_config.data.dir), learning_rate=0.05)
    config.model.kim = False
    keras.utils.set_random_seed(0)
    model, optimizer = _stage_with_optimizer(config, 3)
    beta, dyn = tf.Variable(0.5), tf.Variable(False)
    step = train_lib.make_train_step(model, optimizer, tf.distribute.get_strategy(), 3,
                                     config.train.batch_size, beta, dyn, False)
    batch = _fixed_batch(config, 3)
    losses = [float(step(batch)["loss"]) for _ in range(40)]
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_previous_stage_frozen(data_config):
    """Training stage 2 leaves stage 1's weights and BatchNorm statistics unchanged."""
    config = data_config
    keras.utils.set_random_seed(1)
    stage1 = popnet.build_stage(config, 1)
    popnet.build_variables(stage1, 1, config.data.crop_size)
    before = [v.numpy().copy() for v in stage1.weights]
    assert any("moving" in v.path for v in stage1.weights)
    model, optimizer = _stage_with_optimizer(config, 2, previous=stage1)
    step = train_lib.make_train_step(model, optimizer, tf.distribute.get_strategy(), 2,
                                     config.train.batch_size, tf.Variable(1.0), tf.Variable(False), False)
    batch = _fixed_batch(config, 2)
    for _ in range(3):
        step(batch)
    for v, old in zip(stage1.weights, before):
        np.testing.assert_array_equal(v.numpy(), old, err_msg=v.path)
    assert not any(v is w for v in model.trainable_variables for w in stage1.weights)


def test_init_from_previous_copies_the_encoder(data_config):
    """model.init_from_previous: stage 2's encoder starts as stage 1's trained one (same
    outputs), holds its own variables, and an encoder of another shape is refused."""
    config = data_config
    keras.utils.set_random_seed(2)
    stage1 = popnet.build_stage(config, 1)
    popnet.build_variables(stage1, 1, config.data.crop_size)
    for v in stage1.encoder.weights:  # "trained": anything but the initialisation
        v.assign(np.random.default_rng(len(v.path)).normal(0, 0.1, v.shape).astype(np.float32))
    stage2 = popnet.build_stage(config, 2, previous=stage1)
    popnet.build_variables(stage2, 2, config.data.crop_size)
    image = np.random.default_rng(0).uniform(0, 255, (1, 40, 40, 3)).astype(np.float32)
    assert not np.allclose(stage2.encoder(image), stage1.encoder(image))
    popnet.init_encoder_from(stage2, stage1)
    np.testing.assert_array_equal(stage2.encoder(image), stage1.encoder(image))
    ids = {id(w) for w in stage1.weights}
    assert not any(id(w) in ids for w in stage2.encoder.weights)
    assert stage2.encoder.trainable and not stage1.trainable

    other = smoke_config(os.path.dirname(config.data.dir))
    other.model.filters = config.model.filters * 2
    wide = popnet.build_stage(other, 2, previous=stage1)
    popnet.build_variables(wide, 2, config.data.crop_size)
    with pytest.raises(ValueError, match="init_from_previous"):
        popnet.init_encoder_from(wide, stage1)


def test_backbone_kwargs_reach_the_backbone(data_config):
    config = smoke_config(os.path.dirname(data_config.data.dir))
    config.model.backbone_kwargs.widths = (8, 8, 16, 24)
    model = popnet.build_stage(config, 1)
    popnet.build_variables(model, 1, config.data.crop_size)
    assert model.encoder.backbone.output["high"].shape[-1] == 24
    assert popnet.encoder_kwargs(config)["backbone_kwargs"]["widths"] == (8, 8, 16, 24)


def test_stage_ends_with_the_moving_average_of_its_weights(tmp_path, data_config):
    """train.ema_momentum = m: the last checkpoint of a stage holds, for every trainable
    weight, m²·w1 + m(1−m)·w2 + (1−m)·w3 of the weights w1..w3 after each of its three
    steps (read from a run without the average, one step per epoch); BatchNorm
    statistics stay the raw ones."""
    runs = {}
    for name, momentum in (("raw", 0.0), ("ema", 0.5)):
        config = smoke_config(str(tmp_path), stage1_epochs=3, stage1_steps_per_epoch=1,
                              validate_every=0, ema_momentum=momentum)
        config.data.dir = data_config.data.dir
        workdir = str(tmp_path / name)
        train_lib.check_run_record(config, workdir, 1)
        train_lib.train_stage(config, workdir, 1, 1, config.data.dir)
        state = tf.train.get_checkpoint_state(train_lib.checkpoint_dir(workdir, 1))
        runs[name] = [tf.train.load_checkpoint(p) for p in state.all_model_checkpoint_paths]
    assert len(runs["raw"]) == 3
    ema = runs["ema"][-1]
    keys = [k for k in ema.get_variable_to_shape_map()
            if k.startswith("model/") and "OPTIMIZER_SLOT" not in k]
    trainable = [k for k in keys if "moving_" not in k and "seed_generator" not in k]
    assert trainable and len(trainable) < len(keys)
    for key in keys:
        w1, w2, w3 = (r.get_tensor(key) for r in runs["raw"])
        expected = 0.25 * w1 + 0.25 * w2 + 0.5 * w3 if key in trainable else w3
        np.testing.assert_allclose(ema.get_tensor(key), expected, rtol=1e-5, atol=1e-6,
                                   err_msg=key)


def test_train_resume_equals_uninterrupted(tmp_path, data_config):
    """Killing after epoch 1 and resuming gives the weights and store of a straight run."""
    config = smoke_config(str(tmp_path), stage1_epochs=2)
    config.data.dir = data_config.data.dir
    config.train.validate_every = 0
    straight = str(tmp_path / "straight")
    train_lib.check_run_record(config, straight, 1)
    train_lib.train_stage(config, straight, 1, 1, config.data.dir)

    interrupted = str(tmp_path / "interrupted")
    short = smoke_config(str(tmp_path), stage1_epochs=2)
    short.data.dir = config.data.dir
    short.train.validate_every = 0

    class Stop(Exception):
        pass

    # Simulate a kill right after the first epoch's checkpoint: make epoch 2's dataset fail.
    real_epoch_dataset = train_lib.epoch_dataset

    def failing_epoch_dataset(cfg, data_dir, stage, fold, epoch):
        if epoch == 1:
            raise Stop()
        return real_epoch_dataset(cfg, data_dir, stage, fold, epoch)

    train_lib.epoch_dataset = failing_epoch_dataset
    try:
        with pytest.raises(Stop):
            train_lib.train_stage(short, interrupted, 1, 1, short.data.dir)
    finally:
        train_lib.epoch_dataset = real_epoch_dataset
    with pytest.raises(ValueError, match="--resume"):
        train_lib.train_stage(short, interrupted, 1, 1, short.data.dir)
    train_lib.train_stage(short, interrupted, 1, 1, short.data.dir, resume=True)

    a = train_lib.restore_stage(config, straight, 1)
    b = train_lib.restore_stage(config, interrupted, 1)
    for va, vb in zip(a.weights, b.weights):
        np.testing.assert_allclose(va.numpy(), vb.numpy(), rtol=1e-5, atol=1e-6, err_msg=va.path)


def test_workdir_of_other_fold_refused(tmp_path, data_config):
    train_lib.check_run_record(data_config, str(tmp_path), 1)
    with pytest.raises(ValueError, match="trained with fold=1, but this run asks for fold=2"):
        train_lib.check_run_record(data_config, str(tmp_path), 2)


def test_workdir_of_other_model_refusal_names_only_what_differs(tmp_path, data_config):
    train_lib.check_run_record(data_config, str(tmp_path), 1)
    other = copy.deepcopy(data_config)
    other.model.filters = data_config.model.filters * 2
    other.model.backbone_kwargs.stem = 8                      # a field the workdir lacks
    with pytest.raises(integrity.RunConfigError) as refused:
        train_lib.check_run_record(other, str(tmp_path), 1)
    message = str(refused.value)
    assert (f"trained with model.backbone_kwargs.stem=(absent), model.filters="
            f"{data_config.model.filters}, but this run asks for model.backbone_kwargs.stem=8, "
            f"model.filters={other.model.filters}; use another --workdir") in message
    assert "aspp_rates" not in message  # unchanged fields stay out


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_step_is_finite(data_config, policy):
    config = smoke_config(os.path.dirname(data_config.data.dir), mixed_precision=policy)
    config.model.kim = False
    keras.mixed_precision.set_global_policy(policy)
    try:
        model, optimizer = _stage_with_optimizer(config, 3)
        step = train_lib.make_train_step(model, optimizer, tf.distribute.get_strategy(), 3,
                                         config.train.batch_size, tf.Variable(0.5), tf.Variable(True), False)
        batch = _fixed_batch(config, 3)
        for _ in range(2):
            logs = step(batch)
        assert np.isfinite(float(logs["loss"]))
        assert model.store.prototypes.dtype == "float32"
        if policy == "mixed_float16":
            _check_float16_step_with_non_finite_gradients_is_skipped(model, optimizer, step, batch)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_sgd_weight_decay_is_the_papers_l2_term_inside_momentum():
    """SGD's weight decay is the paper's (PyTorch's, TF DeepLab's) L2 term: wd·w joins the
    gradient and so the momentum, g = ∇L + wd·w, m = μ·m − lr·g, w += m; not Keras'
    decoupled w -= lr·wd·w. A weight of zero data gradient follows that alone."""
    config = synthetic_cpu.get_config("smoke")
    config.train.optimizer, config.train.learning_rate = "sgd", 0.1
    config.train.weight_decay, config.train.momentum, config.train.poly_power = 0.1, 0.9, 0.0

    class Tiny(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(2, 1)
            self.unused = self.add_weight(shape=(), initializer="ones", name="unused")

        def call(self, image, training=False):
            return {"logits": self.conv(image) + 0.0 * self.unused}  # zero gradient

    model = Tiny()
    model(tf.zeros([1, 2, 2, 3]))
    optimizer = train_lib.make_optimizer(config, 10)
    step = train_lib.make_train_step(model, optimizer, tf.distribute.get_strategy(), 1, 2,
                                     None, None, False)
    batch = {"image": tf.ones([2, 2, 2, 3]), "mask": tf.zeros([2, 2, 2], tf.int32)}
    w, m = 1.0, 0.0
    for _ in range(2):
        step(batch)
        m = 0.9 * m - 0.1 * (0.1 * w)
        w += m
    assert float(model.unused.numpy()) == pytest.approx(w, rel=1e-6)  # 0.9711, not 0.9801


def _check_float16_step_with_non_finite_gradients_is_skipped(model, optimizer, step, batch):
    """mixed_float16 trains through a LossScaleOptimizer; a step whose scaled gradients
    overflow changes no weight and leaves the prototype store as it was (the forward pass
    had updated it), and halves the loss scale; the next finite step trains again."""
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    weights = [v.numpy().copy() for v in model.trainable_variables]
    store = [model.store.prototypes.numpy().copy(), model.store.seen.numpy().copy()]
    iterations = int(optimizer.iterations.numpy())
    optimizer.dynamic_scale.assign(3e38)  # loss x scale overflows: infinite gradients
    assert np.isfinite(float(step(batch)["loss"]))
    assert float(optimizer.dynamic_scale.numpy()) == pytest.approx(1.5e38)
    assert int(optimizer.iterations.numpy()) == iterations
    for v, old in zip(model.trainable_variables, weights):
        np.testing.assert_array_equal(v.numpy(), old, err_msg=v.path)
    np.testing.assert_array_equal(model.store.prototypes.numpy(), store[0])
    np.testing.assert_array_equal(model.store.seen.numpy(), store[1])
    assert model.store.prototypes.dtype == "float32"
    optimizer.dynamic_scale.assign(1024.0)
    step(batch)  # finite again: weights and store move
    assert int(optimizer.iterations.numpy()) == iterations + 1
    assert not np.array_equal(model.store.prototypes.numpy(), store[0])
    assert all(np.isfinite(v.numpy()).all() for v in model.weights)


def test_save_load_equal_outputs(tmp_path, data_config):
    config = data_config
    keras.utils.set_random_seed(2)
    stage1 = popnet.build_stage(config, 1)
    popnet.build_variables(stage1, 1, config.data.crop_size)
    model = popnet.build_stage(config, 2, previous=stage1)
    popnet.build_variables(model, 2, config.data.crop_size)
    batch = {k: v for k, v in _fixed_batch(config, 2).items() if k != "class_id"}
    model(batch, training=True, use_dynamic=False)  # fill the store
    path = str(tmp_path / "stage2.keras")
    model.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # Keras' "unbuilt state" warning
        loaded = keras.models.load_model(path)
    want = model(batch, training=False)["ncm_probs"]
    got = loaded(batch, training=False)["ncm_probs"]
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
    np.testing.assert_allclose(loaded.store.prototypes.numpy(), model.store.prototypes.numpy())
    # Every weight, the AGM's too (the NCM prediction above never reads it).
    assert len(loaded.weights) == len(model.weights)
    for want_v, got_v in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(got_v.numpy(), want_v.numpy(), err_msg=want_v.path)


TWO_REPLICAS = textwrap.dedent("""
    import json, sys
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    sys.path.insert(0, {repo!r})
    from configs import synthetic_cpu
    from popnet_tf import train_lib
    from popnet_tf.models import popnet
    config = synthetic_cpu.get_config("smoke")
    config.data.dir = {data!r}
    config.model.kim = False
    config.model.aspp_dropout = 0.0  # replicas draw other dropout masks than one device
    # SGD: its update is linear in the gradient, so all-reduce summation order stays at
    # float precision; Adam's normalisation would amplify it on near-zero gradients.
    config.train.optimizer = "sgd"
    config.train.learning_rate = 0.01
    batch = next(iter(train_lib.epoch_dataset(config, config.data.dir, 3, 1, epoch=0)))
    batch = {{k: v.numpy() for k, v in batch.items()}}
    out = {{}}
    for name, strategy in [("one", tf.distribute.get_strategy()),
                           ("two", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))]:
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = popnet.build_stage(config, 3)
            popnet.build_variables(model, 3, config.data.crop_size)
            popnet.configure_batch_norm(model, config.model.bn_momentum, synchronized=True)
            opt = train_lib.make_optimizer(config, 10)
            opt.build(model.trainable_variables)
            beta, dyn = tf.Variable(0.5), tf.Variable(True)
        step = train_lib.make_train_step(model, opt, strategy, 3, config.train.batch_size, beta, dyn, False)
        ds = tf.data.Dataset.from_tensors(batch).repeat(3)
        losses = [float(step(b)["loss"]) for b in strategy.experimental_distribute_dataset(ds)]
        out[name] = {{"losses": losses, "store": np.asarray(model.store.prototypes.numpy()).tolist()}}
    print("RESULT" + json.dumps(out))
""")


def test_two_replicas_equal_one(tmp_path, data_config):
    script = TWO_REPLICAS.format(repo=REPO, data=data_config.data.dir)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][0]
    out = json.loads(line[len("RESULT"):])
    np.testing.assert_allclose(out["two"]["losses"], out["one"]["losses"], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(out["two"]["store"], out["one"]["store"], rtol=1e-3, atol=1e-4)


FLOAT16_TWO_REPLICAS = textwrap.dedent("""
    import json, sys
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    sys.path.insert(0, {repo!r})
    from configs import synthetic_cpu
    from popnet_tf import train_lib
    from popnet_tf.layers.prototypes import PrototypeStore

    overflow = tf.Variable(True)

    @tf.custom_gradient
    def overflow_on_replica_1(x):
        context = tf.distribute.get_replica_context()
        replica = context.replica_id_in_sync_group if context is not None else 0
        def grad(dy):
            bad = tf.logical_and(overflow, tf.equal(replica, 1))
            return dy * tf.where(bad, float("inf"), 1.0)
        return tf.identity(x), grad

    class Tiny(keras.Model):  # stage 1's interface, with a prototype store
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(3, 1)
            self.store = PrototypeStore(3, 3, momentum=0.5)
        def call(self, image, training=False):
            logits = overflow_on_replica_1(self.conv(image))
            pooled = tf.reduce_mean(logits, axis=[1, 2])
            self.store(tf.tile(pooled[:, None, :], [1, 3, 1]), tf.ones_like(pooled),
                       training=training)
            return {{"logits": logits}}

    config = synthetic_cpu.get_config("smoke")
    config.train.optimizer = "sgd"
    config.train.mixed_precision = "mixed_float16"
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = Tiny()
        model(tf.zeros([1, 4, 4, 3]))
        opt = train_lib.make_optimizer(config, 10)
        opt.build(model.trainable_variables)
    step = train_lib.make_train_step(model, opt, strategy, 1, 4, None, None, False)
    batch = {{"image": tf.random.stateless_normal([4, 4, 4, 3], [0, 1]),
             "mask": tf.zeros([4, 4, 4], tf.int32)}}
    out = {{}}
    for name, bad in (("skipped", True), ("applied", False)):
        overflow.assign(bad)
        before = [v.numpy().copy() for v in model.weights]
        for b in strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch)):
            step(b)
        out[name] = {{"scale": float(opt.dynamic_scale.numpy()),
                     "changed": [v.path for a, v in zip(before, model.weights)
                                 if not np.array_equal(a, v.numpy())],
                     "finite": all(bool(np.isfinite(v.numpy()).all()) for v in model.weights)}}
    print("RESULT" + json.dumps(out))
""")


def test_float16_overflow_on_one_replica_skips_the_step_on_all(tmp_path):
    """Two replicas, mixed_float16: infinite gradients on the second replica only. Keras'
    LossScaleOptimizer reads the first replica's verdict; the step must still be skipped
    (weights, store unchanged and finite, loss scale halved), then train the next step."""
    script = FLOAT16_TWO_REPLICAS.format(repo=REPO)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][0]
    out = json.loads(line[len("RESULT"):])
    assert out["skipped"] == {"scale": 16384.0, "changed": [], "finite": True}, out
    assert out["applied"]["scale"] == 16384.0 and out["applied"]["finite"], out
    assert len(out["applied"]["changed"]) == 4, out  # kernel, bias, store prototypes and seen


MULTI_WORKER = textwrap.dedent("""
    import json, os, socket, sys
    sock = socket.socket(); sock.bind(("localhost", 0)); port = sock.getsockname()[1]; sock.close()
    os.environ["TF_CONFIG"] = json.dumps({{"cluster": {{"worker": [f"localhost:{{port}}"]}},
                                          "task": {{"type": "worker", "index": 0}}}})
    sys.path.insert(0, {repo!r})
    from configs import synthetic_cpu
    from popnet_tf import train_lib
    config = synthetic_cpu.get_config("smoke")
    config.data.dir = {data!r}
    config.model.backbone_weights = {weights!r}  # its check runs TensorFlow ops first
    config.train.strategy = "multiworker"
    config.train.validate_every = 0
    config.train.stage1_steps_per_epoch = 2
    config.eval.max_queries = 2
    train_lib.train(config, {workdir!r}, stage=1, fold=1)
    strategy = train_lib.get_strategy("multiworker")
    print("RESULT" + json.dumps({{"strategy": type(strategy).__name__,
                                 "replicas": strategy.num_replicas_in_sync}}))
""")


def test_multi_worker_strategy_trains_after_the_run_has_used_tensorflow(tmp_path, data_config):
    """MultiWorkerMirroredStrategy (TF_CONFIG set) must be made before TensorFlow runs an
    op; train() used to make it in train_stage, after the backbone weight check (or a
    finished stage's restore) had run ops: "Collective ops must be configured at program
    startup". One worker on localhost, through train() as the command line calls it."""
    from popnet_tf.models import backbones

    config = synthetic_cpu.get_config("smoke")
    source = backbones.build_backbone(config.model.backbone,
                                      **config.model.backbone_kwargs.to_dict())
    weights = str(tmp_path / "small.weights.h5")
    source.save_weights(weights)
    workdir = str(tmp_path / "work")
    script = MULTI_WORKER.format(repo=REPO, data=data_config.data.dir, weights=weights,
                                 workdir=workdir)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][0]
    assert json.loads(line[len("RESULT"):]) == {"strategy": "CollectiveAllReduceStrategy",
                                                "replicas": 1}
    assert train_lib.stage_finished(workdir, 1)


def test_tf_config_selects_multi_worker_and_each_worker_writes_apart(monkeypatch, tmp_path):
    """TF_CONFIG with several workers: `auto` is the multi-worker strategy; the chief (the
    `chief` task, else worker 0) writes the workdir, every other worker a folder of its own,
    so no two workers write the same checkpoint, TensorBoard or result files."""
    workdir = str(tmp_path / "w")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert train_lib.strategy_name("auto") == "default"  # this CPU: no GPUs
    assert train_lib.is_chief() and train_lib.worker_workdir(workdir) == workdir
    two = {"worker": ["host0:2222", "host1:2222"]}
    for task, chief, where in ((("worker", 0), True, workdir),
                               (("worker", 1), False, os.path.join(workdir, "workers", "worker1"))):
        monkeypatch.setenv("TF_CONFIG", json.dumps(
            {"cluster": two, "task": {"type": task[0], "index": task[1]}}))
        assert train_lib.strategy_name("auto") == "multiworker"
        assert train_lib.strategy_name("default") == "default"
        assert train_lib.is_chief() is chief
        assert train_lib.worker_workdir(workdir) == where
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"chief": ["host0:2222"], "worker": ["host1:2222"]},
         "task": {"type": "worker", "index": 0}}))
    assert not train_lib.is_chief()
    assert train_lib.worker_workdir(workdir) == os.path.join(workdir, "workers", "worker0")
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["host0:2222"]}, "task": {"type": "worker", "index": 0}}))
    assert train_lib.strategy_name("auto") == "default" and train_lib.is_chief()


def test_check_config_lists_every_problem():
    from popnet_tf import integrity

    config = synthetic_cpu.get_config()
    train_lib.check_config(config)  # the shipped configs pass
    config.train.strategy = "tpu"
    config.train.beta_schedule = "linear"
    config.model.prediction_head = "both"
    config.model.momentum = 0.0
    config.train.steps_per_epoch = -1
    config.train.ema_momentum = 1.0
    config.data.stage1_crop_size = -8
    config.data.stage1_crop_width = -1
    config.data.crop_width = -3
    with pytest.raises(integrity.RunConfigError) as err:
        train_lib.check_config(config)
    message = str(err.value)
    for part in ("train.strategy='tpu'", "train.beta_schedule='linear'",
                 "model.prediction_head='both'", "model.momentum=0.0", "train.steps_per_epoch=-1",
                 "train.ema_momentum=1.0", "data.stage1_crop_size=-8",
                 "data.stage1_crop_width=-1", "data.crop_width=-3"):
        assert part in message, message


@pytest.mark.parametrize("value", [0, -2])
def test_check_config_refuses_stage1_epochs_below_one(value):
    # 0 or fewer stage-1 epochs trained nothing, wrote stage1/result.json without a
    # checkpoint, and a later --stage=2 crashed restoring it.
    from popnet_tf import integrity

    config = synthetic_cpu.get_config("smoke")
    config.train.stage1_epochs = value
    with pytest.raises(integrity.RunConfigError, match=f"train.stage1_epochs={value}"):
        train_lib.check_config(config)


@pytest.mark.parametrize("name", ["configs.paper", "configs.synthetic_cpu", "configs.baselines.sgone",
                                  "configs.baselines.panet", "configs.baselines.amp",
                                  "configs.baselines.finetune", "configs.ablations.agm",
                                  "configs.ablations.dml_ws_kim_dp"])
def test_shipped_configs_pass_the_check(name):
    import importlib

    train_lib.check_config(importlib.import_module(name).get_config())


def test_auto_precision_follows_native_bfloat16(monkeypatch):
    monkeypatch.setattr(train_lib, "native_bfloat16", lambda: True)
    assert train_lib.precision_policy("auto") == "mixed_bfloat16"
    monkeypatch.setattr(train_lib, "native_bfloat16", lambda: False)
    assert train_lib.precision_policy("auto") == "float32"
    assert train_lib.precision_policy("mixed_float16") == "mixed_float16"
    assert isinstance(train_lib.native_bfloat16(), bool)  # reads this machine without failing


def test_final_table_names_the_method_trained():
    summary = {"novel_miou": 0.1, "base_miou": 0.2, "human_miou": 0.3, "overall_acc": 0.9,
               "per_class_iou": {}, "num_pairs": 10, "head": "model"}
    assert "| POPNet stage 3 fold 1 (10 pairs" in train_lib.format_summary(summary, 3, 1)
    panet = train_lib.format_summary(summary, 3, 2, "panet")
    assert "| PANet stage 3 fold 2 (10 pairs" in panet and "POPNet" not in panet
    assert "| SG-One stage 2 fold 1" in train_lib.format_summary(summary, 2, 1, "sgone")


def test_no_usable_training_support_refused_before_stage_one(tmp_path):
    """s_train whose masks are all background: refused as a one-line run error before any
    model is built (not a traceback when stage 2 starts, after stage 1 has trained)."""
    from PIL import Image
    from popnet_tf.data import build_atr_os, synth

    raw, data = str(tmp_path / "atr"), str(tmp_path / "data")
    ids = synth.generate(raw, 18, 0)
    train, test = ids[:7], ids[7:]                  # q_train 3, s_train 4; q_test 1, s_test 10
    for sid in train[3:]:
        path = os.path.join(raw, "SegmentationClassAug", f"{sid}.png")
        Image.fromarray(np.zeros_like(np.array(Image.open(path)))).save(path)
    (tmp_path / "tr.txt").write_text("\n".join(train) + "\n")
    (tmp_path / "te.txt").write_text("\n".join(test) + "\n")
    build_atr_os.build(raw, data, train_list=str(tmp_path / "tr.txt"),
                       test_list=str(tmp_path / "te.txt"), num_query_train=3, num_test_query=1,
                       num_test_support=10, progress=False, num_workers=0)
    config = smoke_config(str(tmp_path))
    config.data.dir, config.data.synthetic = data, False
    workdir = str(tmp_path / "w")
    with pytest.raises(integrity.RunError, match="no s_train image holds a foreground class"):
        train_lib.train(config, workdir, stage=3, fold=1)
    assert not os.path.exists(train_lib.checkpoint_dir(workdir, 1))


def test_workdir_continued_on_another_dataset_refused(tmp_path, data_config):
    """A later stage (or --resume) with --config.data.dir at a dataset of other content
    is refused in one line before training; the same dataset moved to another folder
    is accepted and run.json then names the folder evaluation reads."""
    import shutil

    from popnet_tf import eval_lib

    workdir = str(tmp_path / "w")
    config = copy.deepcopy(data_config)
    train_lib.train(config, workdir, stage=1, fold=1)
    other = smoke_config(str(tmp_path / "other"))
    other.data.synthetic_seed = 1                       # another dataset, same sizes
    with pytest.raises(integrity.RunConfigError, match="holds another dataset"):
        train_lib.train(other, workdir, stage=2, fold=1)
    assert not os.path.exists(train_lib.checkpoint_dir(workdir, 2))
    assert eval_lib.load_run(workdir)[0].data.dir == config.data.dir
    moved = str(tmp_path / "moved")
    shutil.copytree(config.data.dir, moved)
    manifest = integrity.verify_dataset(moved, deep=False)
    train_lib.check_dataset_record(workdir, moved, manifest)
    assert eval_lib.load_run(workdir)[0].data.dir == moved


@pytest.mark.parametrize("kind", ["missing", "empty", "text", "other_model"])
def test_bad_backbone_weight_file_refused_before_the_workdir(tmp_path, kind):
    # It used to fail inside the first stage's build, with a traceback, after run.json had
    # recorded the bad path; the workdir then refused the run with the corrected path.
    path = tmp_path / f"{kind}.weights.h5"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not a weight file\n")
    elif kind == "other_model":
        keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]).save_weights(path)
    config = synthetic_cpu.get_config("smoke")
    config.model.backbone_weights = str(path)
    config.data.dir = str(tmp_path / "no_dataset")  # the check comes before the dataset's
    workdir = tmp_path / "workdir"
    with pytest.raises(integrity.RunConfigError) as err:
        train_lib.train(config, str(workdir), stage=1, fold=1)
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message
    # The remedy in command-line terms, not the library's `weights=None`.
    assert message.endswith("(--config.model.backbone_weights=)."), message
    assert not workdir.exists()


def test_finished_stage_does_not_need_the_backbone_weight_file(tmp_path, data_config):
    # The checkpoint holds every weight; restoring (a later stage, evaluate, export) used
    # to re-read the weight file and fail once it had been moved or deleted.
    path = tmp_path / "small.weights.h5"
    config = copy.deepcopy(data_config)
    kwargs = dict(config.model.backbone_kwargs.to_dict())
    from popnet_tf.models import backbones

    backbones.build_backbone(config.model.backbone, **kwargs).save_weights(path)
    config.model.backbone_weights = str(path)
    config.train.stage1_steps_per_epoch = 1
    workdir = str(tmp_path / "workdir")
    train_lib.train(config, workdir, stage=1, fold=1)
    os.remove(path)
    train_lib.restore_stage(config, workdir, 1)
    train_lib.train(config, workdir, stage=1, fold=1)  # finished: evaluates it


def test_raw_atr_folder_or_other_folder_as_dataset_refused_before_generating(tmp_path):
    """`--config.data.dir` at the ATR download itself, with the default (synthetic) config:
    synthetic images were generated beside it, then the build refused its folder with a
    traceback. Now one DatasetMissingError naming the folder and the build command."""
    config = synthetic_cpu.get_config("smoke")
    raw = tmp_path / "ATR"
    (raw / "JPEGImages").mkdir(parents=True)
    (raw / "SegmentationClassAug").mkdir()
    config.data.dir = str(raw)
    with pytest.raises(integrity.DatasetMissingError,
                       match=rf"an ATR-layout folder .* --atr_root {raw} --out {raw}_atr_os"):
        train_lib.ensure_dataset(config)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "notes.txt").write_text("not a dataset")
    config.data.dir = str(other)
    with pytest.raises(integrity.DatasetMissingError, match="not empty and holds no manifest"):
        train_lib.ensure_dataset(config)
    assert sorted(os.listdir(tmp_path)) == ["ATR", "photos"]  # nothing generated beside them


def test_oneshot_loss_passes_the_warmup_switch_to_the_model():
    # SPEC §6: during the prototype warm-up the distance maps use the static p_c. The
    # training loss must hand the PrototypeWarmup flag to the model, not a constant.
    seen = []
    labels = tf.constant([[[0, 1]]])                        # [B=1, 1, 2]
    logits = tf.constant([[[[2.0, 0.0], [0.0, 2.0]]]])      # [1, 1, 2, 2]

    def model(batch, training, use_dynamic):
        seen.append((training, bool(use_dynamic)))
        return {"agm_logits": logits, "ncm_logits": logits}

    for flag in (False, True):
        loss, _ = train_lib._oneshot_loss(model, {"query_mask": labels}, 1, 1.0, tf.constant(flag))
        np.testing.assert_allclose(float(loss), np.log1p(np.exp(-2.0)), rtol=1e-5)
    assert seen == [(True, False), (True, True)]


def test_paper_config_holds_the_papers_numbers():
    # SPEC §6-§7, written out by hand: α = 0.001, τ0 = 10, 15 of 30 warm-up epochs, SGD
    # 1e-3 momentum 0.9, weight decay 5e-4, poly 0.9, batch 2, crops 512 / 576, scale
    # 0.5-2, weight shifting, NCM prediction, dynamic prototypes on.
    from configs import paper

    c = paper.get_config()
    assert (c.model.momentum, c.model.initial_temperature) == (0.001, 10.0)
    assert (c.train.prototype_warmup, c.train.epochs, c.train.stage1_epochs) == (15, 30, 30)
    assert (c.train.optimizer, c.train.learning_rate, c.train.momentum) == ("sgd", 1e-3, 0.9)
    assert (c.train.weight_decay, c.train.poly_power, c.train.batch_size) == (5e-4, 0.9, 2)
    assert (c.data.crop_size, c.data.oneway_crop_size) == (512, 576)
    assert tuple(c.data.scale_range) == (0.5, 2.0)
    assert (c.train.beta_schedule, c.eval.head, c.model.dynamic_prototypes) == ("shift", "ncm", True)
