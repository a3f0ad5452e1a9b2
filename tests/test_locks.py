"""One process at a time where two would collide (docs/RELIABILITY.md §8): a second
training in a workdir refuses, a second build of a dataset folder waits, and a
killed holder never leaves a stale lock. The other process is a few lines of Python
holding the same `fcntl.flock` (no TensorFlow import: the tests stay fast)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from configs import synthetic_cpu
from popnet_tf import integrity, train_lib
from popnet_tf.data import build_atr_os, synth

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": ""}

# Holds an exclusive flock on argv[1] for argv[2] seconds, then writes argv[3] (if
# given) and exits, which releases the lock.
_HOLDER = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, f"{os.getpid()}\n".encode())
print("held", flush=True)
time.sleep(float(sys.argv[2]))
if len(sys.argv) > 3:
    os.makedirs(os.path.dirname(sys.argv[3]), exist_ok=True)
    open(sys.argv[3], "w").write("{}")
"""


def _hold(path, seconds, then=None):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), str(seconds),
                             *([str(then)] if then else [])], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_training_in_a_workdir_refuses_then_a_killed_holder_frees_it(tmp_path):
    """Before: both trained the same stage into the same checkpoints (a --resume
    started before the first checkpoint trained from scratch beside the first run)."""
    workdir, data = tmp_path / "w", tmp_path / "data"
    workdir.mkdir()
    holder = _hold(workdir / ".lock", 120)
    try:
        run = subprocess.run(
            [sys.executable, "-m", "popnet_tf.train", "--config=configs/synthetic_cpu.py:smoke",
             "--fold=1", "--stage=2", "--resume", f"--workdir={workdir}",
             f"--config.data.dir={data}"],
            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
        assert run.returncode == 1, run.stderr[-2000:]
        assert "Traceback" not in run.stderr
        assert run.stderr.strip().splitlines()[-1] == (
            f"FATAL BusyError: {workdir} is in use by process {holder.pid}; wait for that "
            "training to end, or stop it (a stopped stage continues with --resume)")
        assert os.listdir(workdir) == [".lock"]  # no run.json, no checkpoint
        assert not os.path.exists(data)                      # no dataset generated
    finally:
        holder.kill()
        holder.wait()
    # SIGKILLed: the kernel released its lock; the file it left is taken over, then removed.
    with integrity.lock_workdir(str(workdir)):  # BusyError if the lock had outlived it
        pass
    assert os.listdir(workdir) == []


def test_training_waits_for_the_dataset_another_process_builds(tmp_path, monkeypatch, caplog):
    """Before: fold 1 and fold 2 started together both generated and built the synthetic
    default into the same folder, each swapping its build in under the other."""
    config = synthetic_cpu.get_config("smoke")
    config.data.dir = str(tmp_path / "data")
    holder = _hold(tmp_path / ".data.lock", 1.0,
                   then=os.path.join(config.data.dir, "manifest.json"))

    def generate(*args, **kwargs):
        raise AssertionError("generated although another process was building the dataset")

    monkeypatch.setattr(synth, "generate", generate)
    with caplog.at_level(logging.INFO, logger="absl"):
        assert train_lib.ensure_dataset(config) == config.data.dir
    assert holder.wait(timeout=60) == 0
    assert f"Waiting for process {holder.pid}, which holds" in caplog.text
    assert "built by the process waited for; using it" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["data"]  # the lock file is gone with its holder


def test_second_build_of_one_out_waits_for_the_first(tmp_path, caplog):
    """Before: two builds of one --out swapped their folders in at once; one could fail
    (rename onto the other's new folder) while a reader found no dataset in between."""
    root = str(tmp_path / "atr")
    synth.generate(root, 22, seed=3, progress=False)
    out = str(tmp_path / "out")
    holder = _hold(tmp_path / ".out.lock", 1.0)
    with caplog.at_level(logging.INFO, logger="absl"):
        build_atr_os.build(root, out, num_query_train=6, num_test_query=4, num_test_support=10,
                           progress=False, num_workers=0)
    assert holder.poll() == 0  # it had released the lock before the build went on
    assert f"Waiting for process {holder.pid}, which holds" in caplog.text
    integrity.verify_dataset(out)
    assert sorted(os.listdir(tmp_path)) == ["atr", "out"]


def test_filesystem_without_locks_runs_unguarded_with_a_warning(tmp_path, monkeypatch, caplog):
    """flock fails with ENOLCK on NFS without lockd (EOPNOTSUPP on some FUSE mounts): the
    run goes on unguarded, as before locks existed, instead of ending in a traceback."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    path = tmp_path / ".lock"
    with caplog.at_level(logging.WARNING, logger="absl"):
        with integrity.hold_lock(str(path), "the workdir", wait=False):
            with integrity.hold_lock(str(path), "the workdir", wait=False):  # nested: no 2nd warning
                ran = True
    assert ran and not path.exists()
    assert caplog.text.count("the filesystem does not support locks") == 1
    assert "the workdir is not guarded against a second process" in caplog.text


def test_dataset_folder_in_an_unwritable_place_is_one_line(tmp_path):
    """The dataset lock goes beside data.dir; a parent that is a file ended in a
    FileExistsError traceback from the lock instead of the CLI's one FATAL line."""
    (tmp_path / "a_file").write_text("not a folder")
    config = synthetic_cpu.get_config("smoke")
    config.data.dir = str(tmp_path / "a_file" / "data")
    with pytest.raises(integrity.WorkdirError, match="cannot write in its folder"):
        train_lib.ensure_dataset(config)
