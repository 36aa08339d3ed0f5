"""Measuring one benchmark stage: wall time, model rows run without and with gradients, and peak memory
(the CUDA allocator's peak, or the process's resident set sampled every 5 ms on the CPU).
"""
from __future__ import annotations

import os
import threading
import time

import torch


class PeakMemory:
    """Peak memory over a block: the CUDA allocator's peak, or the process's resident set sampled every 5 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while not self.stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.stop.set()
            self.thread.join()


class Counting:
    """Wraps a denoiser and counts model rows run without and with gradients."""

    def __init__(self, denoise) -> None:
        self.denoise, self.forward, self.backward = denoise, 0, 0

    def __call__(self, x, sigma, cond, options=None):
        if torch.is_grad_enabled():
            self.backward += x.shape[0]
        else:
            self.forward += x.shape[0]
        return self.denoise(x, sigma, cond, options)


def stage(results, name, device, fn):
    """Run `fn(counter_factory)`, recording wall time, model rows and peak memory under `name`; return its value."""
    counters = []

    def counted(denoise):
        counter = Counting(denoise)
        counters.append(counter)
        return counter

    with PeakMemory(device) as memory:
        start = time.perf_counter()
        value = fn(counted)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    results[name] = {"time_s": seconds, "forward": sum(c.forward for c in counters),
                     "forward_backward": sum(c.backward for c in counters), "peak_mb": memory.peak / 2**20}
    return value
