"""Benchmarks (not tests): how fast the parts of popnet_tf run on this machine.

Sections (`--only`, comma-separated; default all):
- data: training episodes/s of `episodes.train_episodes` (stage 3, fold 1,
  k-way, batch 2) at 512x512 (ATR's own size) and at 128x128 (long side
  resized to 160, the CPU configuration). Median over `--repeats` timed runs
  of `--steps` batches each, after `--warmup` batches; also the process CPU
  time per episode, which shows the cost independent of the load from other
  processes.

Example:
    $ python -m popnet_tf.bench --only data --data tfrecords/synthetic --out bench.json
    data 512x512: 104.2 episodes/s (median of 5), 17.9 ms CPU per episode
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

# (name, crop_size, resize_long_side) of the data section.
DATA_SETTINGS = (("512x512", 512, None), ("128x128", 128, 160))


def _time_batches(iterator, steps: int) -> tuple[float, float]:
    """Wall and process-CPU seconds to pull `steps` batches."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        next(iterator)
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_data(data_dir: str, *, steps: int = 50, repeats: int = 5, warmup: int = 20,
               batch_size: int = 2, cache_decoded: bool = False, seed: int = 0) -> dict:
    """Training-episode throughput at each of `DATA_SETTINGS`.

    Returns:
        {"512x512": {"episodes_per_s": median, "runs": [...], "cpu_ms_per_episode": median,
        ...}, ...}.

    Example:
        >>> bench_data("tfrecords/synthetic", steps=10, repeats=3)["128x128"]["episodes_per_s"]
    """
    from popnet_tf.data import episodes

    if not data_dir:
        raise ValueError("the data section needs --data: a built ATR-OS dataset folder "
                         "(python -m popnet_tf.data.build_atr_os)")
    results = {}
    for name, crop_size, long_side in DATA_SETTINGS:
        ds = episodes.train_episodes(data_dir, stage=3, fold=1, way="kway", batch_size=batch_size,
                                     crop_size=crop_size, resize_long_side=long_side, seed=seed,
                                     cache_decoded=cache_decoded)
        iterator = iter(ds)
        _time_batches(iterator, warmup)   # fills shuffle buffers, tunes parallelism
        runs, cpu = [], []
        for _ in range(repeats):
            wall, used = _time_batches(iterator, steps)
            runs.append(steps * batch_size / wall)
            cpu.append(1000.0 * used / (steps * batch_size))
        results[name] = {
            "episodes_per_s": statistics.median(runs),
            "runs": runs,
            "cpu_ms_per_episode": statistics.median(cpu),
            "crop_size": crop_size, "resize_long_side": long_side,
            "batch_size": batch_size, "steps": steps, "warmup": warmup,
            "cache_decoded": cache_decoded,
        }
    return results


SECTIONS = {"data": bench_data}


def _machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "load_average": load}


def _define_flags():
    from absl import flags

    flags.DEFINE_list("only", list(SECTIONS), f"Sections to run, of {sorted(SECTIONS)}.")
    flags.DEFINE_string("data", None, "Built ATR-OS dataset folder (data section).")
    flags.DEFINE_integer("steps", 50, "Batches per timed run.")
    flags.DEFINE_integer("repeats", 5, "Timed runs; the median is reported.")
    flags.DEFINE_integer("warmup", 20, "Batches pulled before timing.")
    flags.DEFINE_bool("cache_decoded", False, "Data section: keep decoded images in memory.")
    flags.DEFINE_string("out", None, "Write the results as JSON to this file.")
    return flags.FLAGS


def main(argv):
    del argv
    unknown = [s for s in FLAGS.only if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"--only: unknown sections {unknown}; choose from {sorted(SECTIONS)}")
    report = {"machine": _machine(), "sections": {}}
    if "data" in FLAGS.only:
        data = bench_data(FLAGS.data, steps=FLAGS.steps, repeats=FLAGS.repeats, warmup=FLAGS.warmup,
                          cache_decoded=FLAGS.cache_decoded)
        report["sections"]["data"] = data
        for name, r in data.items():
            # A CLI's result line: stdout is the interface here.
            print(f"data {name}: {r['episodes_per_s']:.1f} episodes/s (median of {len(r['runs'])}), "
                  f"{r['cpu_ms_per_episode']:.1f} ms CPU per episode")
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    from absl import app

    FLAGS = _define_flags()
    app.run(main)
