"""Small helpers shared by the side-by-side benchmarks: timing, peak memory, device peak FLOPs, table printing.

Conventions every benchmark here follows:
- time with ``time.perf_counter`` after synchronising the device (``sync``), so GPU work is really finished;
- on CUDA, peak memory is ``torch.cuda.max_memory_allocated`` after ``reset_peak``;
- on CPU there is no allocator high-water mark, so each implementation runs in its own child process with the
  same imports and peak memory is that process's maximum resident set size (``max_rss_bytes``), reported
  against the RSS it had before building its model (``rss_bytes``), which makes the numbers comparable.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) taken by ``repeats`` calls of ``fn``, device work included.

    On a shared CPU the wall time absorbs other processes' load; the CPU time of this process does not (it sums
    over its threads, so divide by the thread count for a per-thread figure)."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(
    fns: dict[str, Callable[[], Any]], device: torch.device, *, warmup: int, rounds: int, steps: int
) -> dict[str, dict[str, list[float]]]:
    """Warm every function up, then time ``steps`` calls of each per round, alternating which goes first.

    Alternation spreads slow drifts of a shared machine (thermal, other processes) evenly over the contenders.
    Returns ``{name: {"wall": [...], "cpu": [...]}}``: seconds per call, one entry per round.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in fns}
    names = list(fns)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            wall, cpu = timed(fns[name], device, steps)
            times[name]["wall"].append(wall / steps)
            times[name]["cpu"].append(cpu / steps)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def median_interval(values: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0):
    """Percentile-bootstrap confidence interval (lo, hi) of the median of ``values``: how far the printed median
    could move if the rounds were run again on the same noisy machine. Seeded, so a run's output is reproducible."""
    import random

    if len(values) < 2:
        raise ValueError("a confidence interval needs at least 2 values")
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1.0 - level) / 2
    return medians[int(tail * (resamples - 1))], medians[int((1.0 - tail) * (resamples - 1))]


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; falls back to the high-water mark)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return max_rss_bytes()


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int:
    """Peak memory since ``reset_peak``: allocator high-water mark on CUDA, max RSS of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return max_rss_bytes()


def peak_bf16_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of ``device`` (None if unknown: pass ``override_tflops``); the trainer's table."""
    from flava.train.flops import peak_flops

    return peak_flops(device, override_tflops)


def run_child(args: Sequence[str], timeout_s: float) -> dict[str, Any]:
    """Run ``python <args>`` in a fresh process; its last stdout line must be a JSON object, which is returned."""
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout_s, env=os.environ.copy()
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"child {' '.join(args)} printed nothing:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f} MiB"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table, so printed output can be pasted into benchmarks/README.md as is."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, cells[1:])])
