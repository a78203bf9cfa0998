"""Timing shared by the benchmarks: interleaved steps, so ratios come from one run."""
import statistics
import time
from typing import Any, Callable, Mapping

import jax


def time_interleaved(cases: Mapping[str, tuple[Callable[..., Any], tuple[Any, ...]]], *,
                     warmup: int, steps: int) -> tuple[dict[str, float], dict[str, float]]:
  """Seconds of the first call (compilation) and median seconds per call of each case.

  After the first call and `warmup` untimed calls of every case, the `steps` timed calls of
  all cases are interleaved, so that drifting machine load affects them alike.
  """
  first_s = {}
  for name, (fn, args) in cases.items():
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first_s[name] = time.perf_counter() - start
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
  times: dict[str, list[float]] = {name: [] for name in cases}
  for _ in range(steps):
    for name, (fn, args) in cases.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return first_s, {name: statistics.median(t) for name, t in times.items()}
