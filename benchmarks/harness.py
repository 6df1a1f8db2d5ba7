"""Timing, memory and table helpers shared by the benchmark scripts.

Every variant runs in a fresh Python process, so no allocator cache or compiler memory of another variant can hide or
inflate anything. Two peaks are measured on the CPU:

  peak_bytes      the most tensor memory the call holds at once above what was held before it: the running total of
                  torch's CPU allocator (every tensor, including temporaries inside an op), read from the profiler's
                  allocation events — the CPU counterpart of torch.cuda.max_memory_allocated, which is what
                  peak_bytes is on CUDA;
  peak_rss_bytes  the process's peak resident set size during the call minus the RSS before it (the kernel's
                  peak-RSS mark is reset first). It adds what the C allocator keeps: glibc does not hand freed heap
                  memory back, so an optimizer step that allocates after the backward sits on top of the heap's
                  high-water mark, and the figure depends on the allocation pattern as much as on the live tensors.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def machine_line() -> str:
    m = machine_info()
    s = f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}"
    if "gpu" in m:
        s += f", {m['gpu']} (CUDA {m['cuda']})"
    return s


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], *, warmup: int = 1, repeat: int = 5, device: str = "cpu") -> float:
    """Median wall time of fn() in seconds, after `warmup` untimed calls."""
    return median_times(fn, warmup=warmup, repeat=repeat, device=device)[0]


def median_times(fn: Callable[[], object], *, warmup: int = 1, repeat: int = 5, device: str = "cpu"
                 ) -> tuple[float, float]:
    """Median wall time and median process CPU time of fn() in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark of this process (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since the last reset_peak_rss (VmHWM), or since the start of the process."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_allocated_cpu(fn: Callable[[], object]) -> int:
    """Peak bytes held by torch's CPU allocator during the second of two calls of fn(), above what it held when that
    call began. The profiler runs over both calls so that every block the measured call frees (gradients, optimizer
    temporaries of the first call) was allocated under it, and its size is known."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
        start = time.time_ns()
        fn()
        end = time.time_ns()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.total_allocated, e.extra_fields.alloc_size))
    events.sort()
    before = [total for t, total, _ in events if t < start]
    during = [(total, size) for t, total, size in events if start <= t <= end]
    if not during:
        return 0
    held = before[-1] if before else during[0][0] - during[0][1]
    return max(0, max(total for total, _ in during) - held)


def run_isolated(module: str, args: list[str], timeout: float = 1800, extra_env: dict | None = None) -> dict:
    """Runs `python -m module args...` in a fresh process (with `extra_env` added to its environment); the child
    prints one JSON line prefixed 'RESULT ' which is returned as a dict."""
    env = dict(os.environ, **(extra_env or {}))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if out.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{module} {' '.join(args)} printed no RESULT line:\n{out.stdout}\n{out.stderr}")


def report(result: dict) -> None:
    """Child side of run_isolated."""
    print("RESULT " + json.dumps(result), flush=True)


def measure_in_child(fn: Callable[[], object], *, warmup: int = 1, repeat: int = 3, device: str = "cpu",
                     prewarm: Callable[[], object] | None = None) -> dict:
    """Time fn and measure the peak memory it adds, from inside an isolated child process.

    `prewarm` (the same code path on tiny inputs) runs first, so one-time library start-up (thread pools, BLAS
    buffers, dispatcher caches) is part of the baseline rather than charged to the measured step. On the CPU the
    first full call sets the RSS peak, the timed calls follow, and two more calls under the profiler give the
    allocator peak (see the module docstring). Baselines are the memory held just before the measured call."""
    if prewarm is not None:
        prewarm()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        t = median_time(fn, warmup=max(0, warmup - 1), repeat=repeat, device=device)
    else:
        import gc

        gc.collect()
        reset_peak_rss()
        base = rss_bytes()
        fn()
        peak_rss = max(0, peak_rss_bytes() - base)
        t, cpu = median_times(fn, warmup=max(0, warmup - 1), repeat=repeat, device=device)
        # Last: the timed calls must not run after a profiler session (it leaves them measurably slower).
        peak = peak_allocated_cpu(fn)
        return {"time_s": t, "cpu_s": cpu, "peak_bytes": peak, "peak_rss_bytes": peak_rss}
    return {"time_s": t, "peak_bytes": max(0, peak)}


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in cells])


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"


def rss_mib(result: dict) -> str:
    """The peak-RSS figure of a CPU result, '-' where there is none (CUDA)."""
    return mib(result["peak_rss_bytes"]) if "peak_rss_bytes" in result else "-"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def device_ceilings() -> dict:
    """Measured ceilings of the GPU: bf16 matmul FLOP rate and device-to-device copy bandwidth."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = median_time(lambda: a @ a, warmup=3, repeat=10, device="cuda")
    flops = 2 * 8192**3 / t
    x = torch.empty(2**30 // 4, device="cuda")
    y = torch.empty_like(x)
    t = median_time(lambda: y.copy_(x), warmup=3, repeat=10, device="cuda")
    return {"bf16_matmul_flops": flops, "copy_bytes_per_s": 2 * x.numel() * 4 / t}
