"""Reliability by fault injection (issue 7; the guarantees are listed in docs/RELIABILITY.md).

Small CPU runs of the real CLI (`python -m popnet_tf.train`, smoke config) are killed,
preempted, fed damaged data, full or read-only disks and wrong flags; each test says
which guarantee it proves. Subprocess runs are bounded by timeouts. Tests that need a
tmpfs mount skip with the reason when mounting is not permitted.
"""

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

from configs import synthetic_cpu
from popnet_tf import integrity, train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4  # steps per epoch of every CLI run here
EPOCHS = 3  # stage-2 epochs: the kill tests need a few checkpoints to land between
RUN_FLAGS = [
    "--config=configs/synthetic_cpu.py:smoke", "--fold=1",
    f"--config.train.steps_per_epoch={STEPS}", f"--config.train.epochs={EPOCHS}",
    "--config.train.validate_every=0", "--config.eval.max_queries=2",
]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2",
       "PYTHONUNBUFFERED": "1"}
TRAIN_TIMEOUT = 300  # seconds for one smoke training run (about 40 s alone)


# ----------------------------------------------------------------------------- helpers
def train_args(data_dir, workdir, stage, *extra):
    return [sys.executable, "-m", "popnet_tf.train", *RUN_FLAGS, f"--config.data.dir={data_dir}",
            f"--workdir={workdir}", f"--stage={stage}", *extra]


def run_cli(args, timeout=120):
    return subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def last_line(text):
    lines = [l for l in text.splitlines() if l.strip()]
    return lines[-1] if lines else ""


def files_under(path):
    return sorted(os.path.relpath(os.path.join(r, f), path)
                  for r, _, fs in os.walk(path) for f in fs)


class Background:
    """A CLI run in the background with its output in files (a pipe could fill up and
    stall the run while the test polls)."""

    def __init__(self, args, log_dir):
        os.makedirs(log_dir, exist_ok=True)
        self.out_path, self.err_path = os.path.join(log_dir, "out"), os.path.join(log_dir, "err")
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.proc = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=self._out, stderr=self._err)

    def wait_for(self, condition, timeout):
        deadline = time.time() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended (rc {self.proc.returncode}) before the condition: "
                                     f"{self.stderr()[-2000:]}")
            if time.time() > deadline:
                self.proc.kill()
                raise AssertionError(f"condition not met within {timeout} s: {self.stderr()[-2000:]}")
            time.sleep(0.02)

    def finish(self, timeout):
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._out.close()
            self._err.close()
        return self.proc.returncode

    def stderr(self):
        with open(self.err_path) as f:
            return f.read()


def checkpoint_dir(workdir, stage):
    return os.path.join(workdir, f"stage{stage}", "checkpoints")


def latest_number(workdir, stage):
    state = tf.train.get_checkpoint_state(checkpoint_dir(workdir, stage))
    return int(state.model_checkpoint_path.rsplit("-", 1)[1]) if state else None


def checkpoint_values(prefix):
    """Every tensor of a checkpoint except the save counter (it counts saves, which a
    resumed run makes more of) and the object graph."""
    reader = tf.train.load_checkpoint(prefix)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if not k.startswith("save_counter") and k != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def assert_same_final_state(workdir, reference):
    """Final checkpoint (model incl. prototype store, optimizer, counters, RNG) and
    result.json metrics of a run equal those of the reference run, exactly."""
    final = os.path.join(checkpoint_dir(reference, 2), f"ckpt-{EPOCHS * STEPS}")
    want = checkpoint_values(final)
    got = checkpoint_values(os.path.join(checkpoint_dir(workdir, 2), f"ckpt-{EPOCHS * STEPS}"))
    assert tf.train.latest_checkpoint(checkpoint_dir(workdir, 2)).endswith(f"ckpt-{EPOCHS * STEPS}")
    assert sorted(got) == sorted(want)
    store = "model/store/prototypes/.ATTRIBUTES/VARIABLE_VALUE"
    assert store in want and np.abs(want[store]).sum() > 0, "the prototype store must be filled"
    assert sum(k.startswith("model/") for k in want) > 100
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    with open(os.path.join(workdir, "stage2", "result.json")) as f:
        got_result = json.load(f)
    with open(os.path.join(reference, "stage2", "result.json")) as f:
        want_result = json.load(f)
    assert got_result["summary"] == want_result["summary"]


@contextlib.contextmanager
def tmpfs(path, size, read_only=False):
    """A tmpfs mounted at `path` for the test; skips the test where mounting is not
    permitted (not root, or a container without CAP_SYS_ADMIN)."""
    os.makedirs(path, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot run mount to simulate a small or read-only disk: {e}")
    if proc.returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here (needs root with CAP_SYS_ADMIN), so "
                    f"a small or read-only disk cannot be simulated: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", path], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", path], capture_output=True, timeout=30)  # still busy


def fill(path):
    """Fills the file system that holds `path` to the last byte."""
    try:
        with open(os.path.join(path, "fill-to-the-end"), "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:
        pass  # full


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The smoke dataset, built once (synthetic images → TFRecords)."""
    config = synthetic_cpu.get_config("smoke")
    config.data.dir = str(tmp_path_factory.mktemp("reliability") / "data")
    return train_lib.ensure_dataset(config)


@pytest.fixture(scope="module")
def stage1_workdir(dataset, tmp_path_factory):
    """A workdir with stage 1 trained, copied by the stage-2 runs below."""
    workdir = str(tmp_path_factory.mktemp("reliability") / "stage1")
    proc = run_cli(train_args(dataset, workdir, 1), timeout=TRAIN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def straight_run(stage1_workdir, tmp_path_factory):
    """Stage 2 trained without interruption: the reference of the kill tests."""
    workdir = str(tmp_path_factory.mktemp("reliability") / "straight")
    shutil.copytree(stage1_workdir, workdir)
    data_dir = json.load(open(os.path.join(workdir, "run.json")))["config"]["data"]["dir"]
    proc = run_cli(train_args(data_dir, workdir, 2), timeout=TRAIN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


# ----------------------------------------------------------------------------- kill / preemption
# Minutes-long process-kill run: outside the 10-minute suite, run with
# `python -m pytest -m benchmark tests/test_reliability.py`. In-process twins in
# tests/test_train.py (resume) and this file (NaN, killed saves) run in every suite.
@pytest.mark.benchmark
@pytest.mark.slow
def test_sigkill_at_random_point_then_resume_equals_uninterrupted(dataset, stage1_workdir,
                                                                  straight_run, tmp_path):
    """Kill: SIGKILL at a random point after the first checkpoint; --resume finishes
    with the final weights, prototype store, optimizer state and metrics of an
    uninterrupted run; without --resume the run refuses in one line."""
    seed = int(os.environ.get("RELIABILITY_SEED", time.time_ns() % 10**6))
    delay = random.Random(seed).uniform(0.0, 2.5)
    workdir = str(tmp_path / "killed")
    shutil.copytree(stage1_workdir, workdir)
    run = Background(train_args(dataset, workdir, 2), str(tmp_path / "log"))
    state_file = os.path.join(checkpoint_dir(workdir, 2), "checkpoint")
    run.wait_for(lambda: os.path.exists(state_file), timeout=TRAIN_TIMEOUT)
    time.sleep(delay)
    run.proc.send_signal(signal.SIGKILL)
    assert run.finish(timeout=60) == -signal.SIGKILL, "the run ended before it was killed"
    at_kill = latest_number(workdir, 2)
    assert at_kill in range(STEPS, EPOCHS * STEPS + 1, STEPS), at_kill
    note = f"(seed {seed}: killed {delay:.2f} s after the first checkpoint, latest ckpt-{at_kill})"
    assert not os.path.exists(os.path.join(workdir, "stage2", "result.json")) or at_kill == EPOCHS * STEPS

    refused = run_cli(train_args(dataset, workdir, 2))
    assert refused.returncode == 1, note
    assert re.match(r"FATAL RunConfigError: .*stage2/checkpoints holds an unfinished stage-2 run; "
                    r"pass --resume", last_line(refused.stderr)), (note, refused.stderr[-2000:])
    assert "Traceback" not in refused.stderr

    resumed = run_cli(train_args(dataset, workdir, 2, "--resume"), timeout=TRAIN_TIMEOUT)
    assert resumed.returncode == 0, (note, resumed.stderr[-3000:])
    assert_same_final_state(workdir, straight_run)


# Minutes-long process-kill run: outside the 10-minute suite, run with
# `python -m pytest -m benchmark tests/test_reliability.py`. In-process twins in
# tests/test_train.py (resume) and this file (NaN, killed saves) run in every suite.
@pytest.mark.benchmark
@pytest.mark.slow
def test_sigterm_checkpoints_mid_epoch_then_resume_equals_uninterrupted(dataset, stage1_workdir,
                                                                        straight_run, tmp_path):
    """Preemption: SIGTERM mid-epoch saves a checkpoint at the step reached and
    exits with status 143 and a one-line message; --resume continues from that step
    and ends exactly as an uninterrupted run."""
    workdir = str(tmp_path / "preempted")
    shutil.copytree(stage1_workdir, workdir)
    run = Background(train_args(dataset, workdir, 2), str(tmp_path / "log"))
    state_file = os.path.join(checkpoint_dir(workdir, 2), "checkpoint")
    run.wait_for(lambda: os.path.exists(state_file), timeout=TRAIN_TIMEOUT)  # epoch 1 saved
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish(timeout=120) == 143, run.stderr()[-3000:]
    message = last_line(run.stderr())
    match = re.fullmatch(r"PREEMPTED SIGTERM: stage 2 checkpointed at epoch (\d+) step (\d+); "
                         r"continue with --resume", message)
    assert match, run.stderr()[-3000:]
    assert "Traceback" not in run.stderr()
    epoch, step = int(match.group(1)), int(match.group(2))
    # Normally epoch 2 step 1; later only when the polling test process was starved.
    assert epoch in (2, 3) and 1 <= step < STEPS, f"not mid-epoch: epoch {epoch} step {step}"
    number = latest_number(workdir, 2)
    assert number == (epoch - 1) * STEPS + step
    values = checkpoint_values(os.path.join(checkpoint_dir(workdir, 2), f"ckpt-{number}"))
    assert int(values["epoch/.ATTRIBUTES/VARIABLE_VALUE"]) == epoch - 1
    assert int(values["step_in_epoch/.ATTRIBUTES/VARIABLE_VALUE"]) == step

    resumed = run_cli(train_args(dataset, workdir, 2, "--resume"), timeout=TRAIN_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (f"Resuming stage 2 from {checkpoint_dir(workdir, 2)}/ckpt-{number} "
            f"(epoch {epoch - 1}, step {step})") in resumed.stderr
    assert_same_final_state(workdir, straight_run)


# ----------------------------------------------------------------------------- bad numbers
def _stage1_config(data_dir):
    config = synthetic_cpu.get_config("smoke")
    config.data.dir = data_dir
    config.train.stage1_epochs = 2
    config.train.steps_per_epoch = 3
    config.train.validate_every = 0
    return config


def _poisoning_step_factory(at_call, before):
    """Wraps train_lib.make_train_step: at call `at_call` a kernel of the model is set to
    NaN, before the step (the step's loss is NaN) or after it (the loss it reports is
    finite, the weights it leaves are not)."""
    real = train_lib.make_train_step

    def factory(model, *args, **kwargs):
        step = real(model, *args, **kwargs)
        calls = [0]

        def poison():
            kernel = next(v for v in model.trainable_variables if "kernel" in v.path)
            kernel.assign(np.full(kernel.shape, np.nan, kernel.dtype))

        def wrapped(batch):
            calls[0] += 1
            if calls[0] == at_call and before:
                poison()
            logs = step(batch)
            if calls[0] == at_call and not before:
                poison()
            return logs

        return wrapped

    return factory


def _assert_all_checkpoints_finite(directory):
    state = tf.train.get_checkpoint_state(directory)
    for prefix in state.all_model_checkpoint_paths:
        for key, value in checkpoint_values(prefix).items():
            if np.issubdtype(np.asarray(value).dtype, np.floating):
                assert np.all(np.isfinite(value)), f"{prefix}: {key} holds NaN/Inf"


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(dataset, tmp_path, monkeypatch):
    """Bad numbers: a NaN loss at epoch 2 step 2 stops the run with a message naming
    the step; ckpt-3 (end of epoch 1) stays latest; no checkpoint holds NaN."""
    config = _stage1_config(dataset)
    workdir = str(tmp_path / "w")
    monkeypatch.setattr(train_lib, "make_train_step", _poisoning_step_factory(5, before=True))
    with pytest.raises(FloatingPointError) as info:
        train_lib.train_stage(config, workdir, 1, 1, dataset)
    message = str(info.value)
    assert re.search(r"stage 1: non-finite loss nan at epoch 2 step 2; the last good checkpoint "
                     r"stays latest: .*ckpt-3$", message), message
    assert latest_number(workdir, 1) == 3
    _assert_all_checkpoints_finite(checkpoint_dir(workdir, 1))
    assert not os.path.exists(os.path.join(workdir, "stage1", "result.json"))


def test_nan_weights_with_finite_loss_are_never_saved(dataset, tmp_path, monkeypatch):
    """Bad numbers: the last step of epoch 1 reports a finite loss but leaves NaN
    weights; the end-of-epoch checkpoint is refused, naming the variable, and no
    checkpoint is written."""
    config = _stage1_config(dataset)
    workdir = str(tmp_path / "w")
    monkeypatch.setattr(train_lib, "make_train_step", _poisoning_step_factory(3, before=False))
    with pytest.raises(integrity.NonFiniteError) as info:
        train_lib.train_stage(config, workdir, 1, 1, dataset)
    assert re.search(r"stage 1: checkpoint 3 not saved, the last good one \(None\) stays latest: "
                     r"1 variables hold NaN or Inf \(.*kernel", str(info.value)), str(info.value)
    assert tf.train.get_checkpoint_state(checkpoint_dir(workdir, 1)) is None
    assert not os.path.exists(checkpoint_dir(workdir, 1)) or files_under(checkpoint_dir(workdir, 1)) == []


# ----------------------------------------------------------------------------- corrupt inputs
@pytest.fixture
def data_copy(dataset, tmp_path):
    path = str(tmp_path / "data")
    shutil.copytree(dataset, path)
    return path


def _shard(data_dir, split):
    return os.path.join(data_dir, f"{split}-00000-of-00001.tfrecord")


def _edit_manifest(data_dir, edit):
    path = os.path.join(data_dir, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)


def _flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _truncate(path, fraction):
    os.truncate(path, int(os.path.getsize(path) * fraction))


def test_crc32c_check_value_and_framing_matches_tensorflow(dataset):
    """The framing walk counts what TensorFlow's own reader reads, on every shard."""
    assert integrity.crc32c(b"123456789") == 0xE3069283  # the published CRC-32C check value
    for name in sorted(os.listdir(dataset)):
        if name.endswith(".tfrecord"):
            path = os.path.join(dataset, name)
            want = sum(1 for _ in tf.data.TFRecordDataset(path))
            assert integrity.tfrecord_framing(path) == (want, None), name


DAMAGES = {
    # name: (damage(data_dir), expected message pattern)
    "truncated shard": (lambda d: _truncate(_shard(d, "q_train"), 0.6),
                        r"q_train-00000-of-00001\.tfrecord: truncated: record \d+ needs bytes up to \d+, "
                        r"the file ends at \d+"),
    "cut inside a header": (lambda d: os.truncate(_shard(d, "s_test"), 5),
                            r"s_test-00000-of-00001\.tfrecord: truncated: ends 5 bytes into the header "
                            r"of record 1"),
    "payload byte changed": (lambda d: _flip_byte(_shard(d, "s_train"), 5000),
                             r"s_train-00000-of-00001\.tfrecord: sha256 differs from the manifest's"),
    "header byte changed": (lambda d: _flip_byte(_shard(d, "q_test"), 0),
                            r"q_test-00000-of-00001\.tfrecord: damaged header of record 1 at byte 0"),
    "listed shard missing": (lambda d: os.remove(_shard(d, "q_test")),
                             r"q_test-00000-of-00001\.tfrecord: listed in the manifest but missing"),
    "unlisted shard": (lambda d: shutil.copy(_shard(d, "q_test"),
                                             os.path.join(d, "q_test-00001-of-00002.tfrecord")),
                       r"q_test-00001-of-00002\.tfrecord: shard not listed in the manifest"),
    "manifest missing": (lambda d: os.remove(os.path.join(d, "manifest.json")),
                         r"manifest\.json: missing"),
    "manifest cut short": (lambda d: _truncate(os.path.join(d, "manifest.json"), 0.5),
                           r"manifest\.json: unreadable \("),
    "manifest checksum changed": (
        lambda d: _edit_manifest(d, lambda m: m["splits"]["q_train"]["shards"].update(
            {"q_train-00000-of-00001.tfrecord": "0" * 64})),
        r"q_train-00000-of-00001\.tfrecord: sha256 differs from the manifest's"),
    "other class set": (lambda d: _edit_manifest(d, lambda m: m["class_names"].pop()),
                        r"manifest\.json: built for the classes \[.*\], this code uses"),
    "count differs": (lambda d: _edit_manifest(d, lambda m: m["splits"]["q_test"].update(count=11)),
                      r"split q_test holds 10 records in its shards, the manifest counts 11"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_dataset_named_before_training(data_copy, damage):
    """Corrupt inputs: each damage raises DatasetIntegrityError naming the file, what
    is wrong and how to rebuild."""
    integrity.verify_dataset(data_copy)  # intact copy passes
    apply, pattern = DAMAGES[damage]
    apply(data_copy)
    with pytest.raises(integrity.DatasetIntegrityError) as info:
        integrity.verify_dataset(data_copy)
    message = str(info.value)
    assert re.search(pattern, message), message
    assert "python -m popnet_tf.data.build_atr_os" in message and f"--out {data_copy}" in message
    assert "\n" not in message


def test_shallow_check_skips_checksums_only(data_copy):
    """deep=False: framing and counts still checked, sha256 not (a changed payload
    byte passes, a truncation does not)."""
    _flip_byte(_shard(data_copy, "s_train"), 5000)
    integrity.verify_dataset(data_copy, deep=False)
    _truncate(_shard(data_copy, "s_train"), 0.9)
    with pytest.raises(integrity.DatasetIntegrityError, match="s_train-00000-of-00001.tfrecord: truncated"):
        integrity.verify_dataset(data_copy, deep=False)


def test_cli_truncated_shard_fails_before_training(data_copy, tmp_path):
    """Corrupt inputs at train time: the CLI names the shard in one line and exits
    before any model is built (no checkpoint, no TensorBoard log)."""
    _truncate(_shard(data_copy, "q_train"), 0.5)
    workdir = str(tmp_path / "w")
    start = time.time()
    proc = run_cli(train_args(data_copy, workdir, 1))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert re.match(r"FATAL DatasetIntegrityError: .*/q_train-00000-of-00001\.tfrecord: truncated",
                    last_line(proc.stderr)), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert files_under(workdir) == ["run.json"]
    assert time.time() - start < 60


# ----------------------------------------------------------------------------- atomic outputs
SAVE_LOOP = textwrap.dedent("""
    import sys
    import tensorflow as tf
    sys.path.insert(0, {repo!r})
    from popnet_tf import integrity
    # A large constant payload makes the save most of each iteration.
    payload = tf.Variable(tf.range({size}, dtype=tf.float32))
    number = tf.Variable(0, dtype=tf.int64)
    manager = integrity.CheckedCheckpointManager(
        tf.train.Checkpoint(payload=payload, number=number), {directory!r}, max_to_keep=2,
        variables=[payload])
    if manager.latest_checkpoint:
        number.assign(int(manager.latest_checkpoint.rsplit("-", 1)[1]))
    while True:
        number.assign_add(1)
        manager.save(checkpoint_number=int(number.numpy()))
""")


def test_checkpoint_save_killed_midway_keeps_previous_latest(tmp_path):
    """Atomic checkpoints: a process saving 32 MB checkpoints in a loop is SIGKILLed at
    random moments (at least twice, until one lands inside a save); each time the
    `checkpoint` state file names a complete checkpoint (its payload intact, its number
    its own), and the next manager removes the killed save's leftovers."""
    directory = str(tmp_path / "ckpts")
    size = 8 * 2**20  # float32: 32 MB per checkpoint, so a save takes a while
    script = SAVE_LOOP.format(repo=REPO, size=size, directory=directory)
    rng = random.Random(0)
    payload = np.arange(size, dtype=np.float32)
    mid_save = 0
    state_file = os.path.join(directory, "checkpoint")
    rounds = 0
    while rounds < 2 or (not mid_save and rounds < 6):  # a kill inside a save is likely, not sure
        rounds += 1
        first = tf.train.get_checkpoint_state(directory)
        first = int(first.model_checkpoint_path.rsplit("-", 1)[1]) if first else 0
        run = Background([sys.executable, "-c", script], str(tmp_path / f"log{rounds}"))

        def saved_one():
            state = tf.train.get_checkpoint_state(directory) if os.path.exists(state_file) else None
            return state is not None and int(state.model_checkpoint_path.rsplit("-", 1)[1]) > first

        run.wait_for(saved_one, timeout=TRAIN_TIMEOUT)
        time.sleep(rng.uniform(0.0, 0.5))
        run.proc.send_signal(signal.SIGKILL)
        assert run.finish(timeout=60) == -signal.SIGKILL
        state = tf.train.get_checkpoint_state(directory)
        latest = int(state.model_checkpoint_path.rsplit("-", 1)[1])
        # Inside a save: the next checkpoint's files were being written, or the old
        # ones were being deleted after the state file already named the new one
        # (TensorFlow records the state before its sweep, and again after).
        leftovers = [n for n in os.listdir(directory) if n.startswith(f"ckpt-{latest + 1}")]
        listed = state.all_model_checkpoint_paths
        mid_save += bool(leftovers) or len(listed) > 2
        assert state.model_checkpoint_path == listed[-1]
        for prefix in listed:
            if prefix != state.model_checkpoint_path and not os.path.exists(prefix + ".index"):
                continue  # swept, never the latest
            integrity.verify_checkpoint(prefix)
            reader = tf.train.load_checkpoint(prefix)
            assert int(reader.get_tensor("number/.ATTRIBUTES/VARIABLE_VALUE")) == int(
                prefix.rsplit("-", 1)[1]), prefix
            np.testing.assert_array_equal(reader.get_tensor("payload/.ATTRIBUTES/VARIABLE_VALUE"),
                                          payload, err_msg=prefix)
    assert mid_save >= 1, f"none of {rounds} kills landed inside a save; the test proved nothing"
    value = tf.Variable(tf.zeros([4]))
    integrity.CheckedCheckpointManager(tf.train.Checkpoint(value=value), directory, max_to_keep=2,
                                       variables=[value])
    assert not [n for n in os.listdir(directory) if n.endswith("_temp")]


def test_damaged_newest_checkpoint_named_with_fallback(tmp_path):
    """A truncated or altered newest checkpoint is named (instead of TensorFlow's
    `IndexError: Read less bytes than requested`), with the earlier one to fall back
    to; following the message's steps restores the earlier checkpoint."""
    directory = str(tmp_path / "ckpts")
    value = tf.Variable(tf.zeros([1000]))
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(value=value), directory, max_to_keep=3)
    for number in (1, 2):
        value.assign(tf.fill([1000], float(number)))
        manager.save(checkpoint_number=number)
    data = os.path.join(directory, "ckpt-2.data-00000-of-00001")
    for damage in (lambda: _flip_byte(data, 100), lambda: _truncate(data, 0.5)):
        damage()
        with pytest.raises(integrity.CheckpointIntegrityError) as info:
            integrity.verify_checkpoint(os.path.join(directory, "ckpt-2"))
        message = str(info.value)
        assert re.search(r"ckpt-2: checkpoint does not read back \(.+\)\. Other checkpoints kept: ckpt-1; "
                         r"to resume from one, move ckpt-2\.\* out of", message), message
    aside = tmp_path / "aside"
    aside.mkdir()
    for name in os.listdir(directory):
        if name.startswith("ckpt-2."):
            shutil.move(os.path.join(directory, name), aside / name)
    state_file = os.path.join(directory, "checkpoint")
    with open(state_file) as f:
        state = f.read()
    with open(state_file, "w") as f:  # the message's second step, done as a user would
        f.write(state.replace('model_checkpoint_path: "ckpt-2"', 'model_checkpoint_path: "ckpt-1"'))
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(value=value), directory, max_to_keep=3)
    integrity.verify_checkpoint(manager.latest_checkpoint)
    tf.train.Checkpoint(value=value).restore(manager.latest_checkpoint).assert_consumed()
    assert np.all(value.numpy() == 1.0)


# Minutes-long process-kill run: outside the 10-minute suite, run with
# `python -m pytest -m benchmark tests/test_reliability.py`. In-process twins in
# tests/test_train.py (resume) and this file (NaN, killed saves) run in every suite.
@pytest.mark.benchmark
@pytest.mark.slow
def test_export_killed_midway_leaves_no_version(straight_run, tmp_path):
    """Atomic SavedModel export (popnet_tf.export_lib): SIGKILL while the SavedModel is
    being written leaves no version folder, so TF Serving (which loads integer-named
    folders only) never sees a partial model."""
    out = str(tmp_path / "exported")
    run = Background([sys.executable, "-m", "popnet_tf.export", f"--workdir={straight_run}",
                      f"--out={out}"], str(tmp_path / "log"))
    run.wait_for(lambda: os.path.isdir(out) and any(n.startswith(".tmp-") for n in os.listdir(out)),
                 timeout=TRAIN_TIMEOUT)
    time.sleep(random.Random(0).uniform(0.0, 0.5))
    run.proc.send_signal(signal.SIGKILL)
    assert run.finish(timeout=60) == -signal.SIGKILL, "the export ended before it was killed"
    assert not [n for n in os.listdir(out) if n.isdigit()], os.listdir(out)


def test_json_write_failure_keeps_previous_file(tmp_path):
    """result.json/run.json: a write that fails half-way leaves the previous file and
    no temporary beside it."""
    path = str(tmp_path / "result.json")
    train_lib.write_json_atomic(path, {"summary": {"human_miou": 0.5}})

    class Unprintable:
        def __str__(self):
            raise RuntimeError("cannot serialise")

    with pytest.raises(RuntimeError):
        train_lib.write_json_atomic(path, {"a": list(range(5000)), "z": Unprintable()})
    with open(path) as f:
        assert json.load(f) == {"summary": {"human_miou": 0.5}}
    assert os.listdir(tmp_path) == ["result.json"]


def test_atomic_write_failure_keeps_previous_file(tmp_path):
    """table.md and gallery.png (write_atomic): the table used to be opened for writing,
    and so emptied, before its text was written."""
    path = str(tmp_path / "table.md")
    train_lib.write_atomic(path, "| previous |\n")
    with pytest.raises(TypeError):
        train_lib.write_atomic(path, 12345)  # neither str nor bytes: fails inside the write
    with open(path) as f:
        assert f.read() == "| previous |\n"
    assert os.listdir(tmp_path) == ["table.md"]
    train_lib.write_atomic(path, b"\x89PNG")
    assert open(path, "rb").read() == b"\x89PNG"


def test_undefined_metrics_are_written_as_null_not_nan(tmp_path):
    """A test split without the fold's novel classes leaves novel MIoU undefined (NaN):
    result.json / results.json stay strict JSON (null), readable by any JSON parser."""
    from popnet_tf import metrics

    matrix = np.zeros((12, 12), np.int64)
    matrix[0, 0], matrix[3, 3] = 50, 5           # background and upper-clothes only
    summary = metrics.kway_summary(matrix, novel=(5, 7, 9))
    assert np.isnan(summary["novel_miou"])
    path = str(tmp_path / "results.json")
    train_lib.write_json_atomic(path, {"summary": summary, "inf": np.float32("inf"),
                                       "array": np.array([1.0, np.nan])})

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    with open(path) as f:
        written = json.loads(f.read(), parse_constant=refuse)
    assert written["summary"]["novel_miou"] is None
    assert written["summary"]["human_miou"] == 1.0
    assert written["inf"] is None and written["array"] == [1.0, None]


# ----------------------------------------------------------------------------- disk full / no permission
def test_workdir_under_a_file_fails_fast(dataset, tmp_path):
    """No permission (runs everywhere): a workdir that cannot be created is refused in
    one line naming it, before any work."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    workdir = str(blocker / "w")
    proc = run_cli(train_args(dataset, workdir, 1))
    assert proc.returncode == 1
    assert re.fullmatch(rf"FATAL WorkdirError: {re.escape(workdir)}: cannot write the workdir "
                        r"\(Not a directory; \d+ KiB free there\); choose a writable --workdir with "
                        r"free space", last_line(proc.stderr)), proc.stderr[-2000:]


def test_read_only_workdir_fails_fast(dataset, tmp_path):
    """No permission: a read-only workdir (a read-only tmpfs: root ignores chmod) is
    refused in one line naming it, and nothing is written."""
    mount = str(tmp_path / "ro")
    with tmpfs(mount, "1m", read_only=True):
        workdir = os.path.join(mount, "w")
        proc = run_cli(train_args(dataset, workdir, 1))
        assert proc.returncode == 1
        assert re.fullmatch(rf"FATAL WorkdirError: {re.escape(workdir)}: cannot write the workdir "
                            r"\(Read-only file system; .*", last_line(proc.stderr)), proc.stderr[-2000:]
        assert os.listdir(mount) == []


def test_small_disk_fails_before_training(dataset, tmp_path):
    """Disk full: a workdir on a 512 KiB disk is refused before training (the stage-1
    checkpoints need about 4 MiB each), naming the folder and the shortfall; nothing
    but the complete run.json is written."""
    mount = str(tmp_path / "small")
    with tmpfs(mount, "512k"):
        workdir = os.path.join(mount, "w")
        proc = run_cli(train_args(dataset, workdir, 1))
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert re.fullmatch(r"FATAL WorkdirError: .*/w/stage1/checkpoints: \d+ KiB free, but stage 1 "
                            r"keeps 3 checkpoints of about \d+ KiB each \(plus one being written\): "
                            r"free \d+ KiB more or choose another --workdir",
                            last_line(proc.stderr)), proc.stderr[-3000:]
        assert "epoch 1/1" not in proc.stderr  # refused before the first epoch
        assert files_under(workdir) == ["run.json"]
        json.load(open(os.path.join(workdir, "run.json")))


def test_full_disk_probe_and_failed_save_leave_nothing_partial(tmp_path, monkeypatch):
    """Disk full during a run: a save without room is refused before writing; a save
    that fails while writing (free space misjudged: the check is patched away) leaves
    no partial file and the previous checkpoint latest; a full disk fails the workdir
    probe."""
    mount = str(tmp_path / "disk")
    with tmpfs(mount, "1m"):
        directory = os.path.join(mount, "ckpts")
        value = tf.Variable(tf.fill([64 * 1024], 1.0))  # 256 KiB
        manager = integrity.CheckedCheckpointManager(tf.train.Checkpoint(value=value), directory,
                                                     max_to_keep=1, variables=[value], what="test")
        manager.save(checkpoint_number=1)
        with open(os.path.join(mount, "filler"), "wb") as f:
            f.write(b"\0" * 600_000)  # about 150 KiB left: less than a checkpoint
        before = sorted(os.listdir(directory))
        value.assign(tf.fill([64 * 1024], 2.0))
        with pytest.raises(integrity.WorkdirError, match=r"test: checkpoint 2 not saved: \d+ KiB free"):
            manager.save(checkpoint_number=2)
        assert sorted(os.listdir(directory)) == before
        monkeypatch.setattr(integrity, "free_bytes", lambda path: 1 << 40)
        failed = r"writing test: checkpoint 2 failed \(.*No space left on device.*\); its partial files"
        with pytest.raises(integrity.WorkdirError, match=failed):
            manager.save(checkpoint_number=2)
        assert sorted(os.listdir(directory)) == before
        assert manager.latest_checkpoint.endswith("ckpt-1")
        assert tf.train.get_checkpoint_state(directory).model_checkpoint_path.endswith("ckpt-1")
        monkeypatch.undo()

        fill(mount)
        with pytest.raises(integrity.WorkdirError, match=r"cannot write the workdir \(No space left"):
            integrity.check_workdir(os.path.join(mount, "w"))
        assert not [n for n in os.listdir(os.path.join(mount, "w")) if n.startswith(".write-probe")]
        with pytest.raises(OSError):
            train_lib.write_json_atomic(os.path.join(mount, "w", "run.json"), {"a": "x" * 10000})
        assert os.listdir(os.path.join(mount, "w")) == []


# ----------------------------------------------------------------------------- bad configs and flags
def _fold2_workdir(workdir):
    train_lib.check_run_record(synthetic_cpu.get_config("smoke"), workdir, 2)


def _other_class_set_workdir(workdir):
    train_lib.check_run_record(synthetic_cpu.get_config("smoke"), workdir, 1)
    path = os.path.join(workdir, "run.json")
    record = json.load(open(path))
    record["class_names"] = record["class_names"][:-1]
    json.dump(record, open(path, "w"))


def _unfinished_stage_workdir(workdir):
    train_lib.check_run_record(synthetic_cpu.get_config("smoke"), workdir, 1)
    value = tf.Variable(1.0)
    tf.train.CheckpointManager(tf.train.Checkpoint(v=value), checkpoint_dir(workdir, 1), 1).save(3)


BAD_RUNS = {
    # name: (flags besides --stage=1, workdir setup, pattern of the one error line)
    "unknown config key": (["--config.train.nonexistent=1"], None,
                           r"FATAL Flags parsing error: --config\.train\.nonexistent: the config has no "
                           r"field 'nonexistent' \(the fields and their meaning are in configs/common\.py\)"),
    "fold 3": (["--fold=3"], None,
               r"FATAL Flags parsing error: flag --fold=3: value should be one of <1\|2>"),
    "workdir of fold 2": (["--stage=3"], _fold2_workdir,
                          r"FATAL RunConfigError: .*/run\.json: this workdir was trained with fold=2, but "
                          r"this run asks for fold=1; use another --workdir"),
    "workdir of another class set": (["--stage=3"], _other_class_set_workdir,
                                     r"FATAL RunConfigError: .*/run\.json: this workdir was trained with "
                                     r"class_names=\[.*\], but this run asks for class_names=\[.*'bag'\]; "
                                     r"use another --workdir"),
    "bad config values": (["--config.train.optimizer=adam", "--config.model.backbone=resnet50",
                           "--config.train.batch_size=0"], None,
                          r"FATAL RunConfigError: bad config: train\.optimizer='adam': choose one of "
                          r"sgd, adamw; model\.backbone='resnet50': choose one of xception, small, "
                          r"mobilenet_v2; train\.batch_size=0: must be an integer >= 1"),
    "unfinished stage without --resume": ([], _unfinished_stage_workdir,
                                          r"FATAL RunConfigError: .*/stage1/checkpoints holds an unfinished "
                                          r"stage-1 run; pass --resume to continue it, or choose a new "
                                          r"--workdir"),
}


@pytest.mark.parametrize("case", sorted(BAD_RUNS))
def test_bad_config_or_flags_one_line_before_any_work(case, tmp_path):
    """Bad configs and flags: one error line (no traceback), exit status 1, and no
    dataset generated, no stage trained."""
    extra, setup, pattern = BAD_RUNS[case]
    workdir = str(tmp_path / "w")
    data_dir = str(tmp_path / "data")  # the synthetic config would generate it if reached
    if setup:
        setup(workdir)
    before = files_under(workdir) if os.path.exists(workdir) else []
    proc = run_cli(train_args(data_dir, workdir, 1, *extra))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    fatal = [l for l in proc.stderr.splitlines() if l.startswith("FATAL")]
    assert len(fatal) == 1 and re.fullmatch(pattern, fatal[0]), proc.stderr[-3000:]
    if not fatal[0].startswith("FATAL Flags"):
        assert fatal[0] == last_line(proc.stderr)
    assert not os.path.exists(data_dir)
    assert (files_under(workdir) if os.path.exists(workdir) else []) == before
