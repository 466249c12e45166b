"""The memory budget: how many bytes a run may hold, and what that buys.

`--memory-budget SIZE` bounds the process's peak anonymous memory (RssAnon: the interpreter, torch,
the meta-device model, hidden states held between layers, the resident part of a layer, staging and
chunk buffers). With none given it is derived from what the machine has available when the run
starts (MemAvailable), so a full-width layer never exhausts a small host. On CUDA the same SIZE also
bounds GPU memory (torch's allocated bytes), which holds the resident layer, the expert chunk buffers,
activations and, when it fits, the hidden-state tier; with none given the GPU bound is 90% of the free
device memory at start.

The unit of residency follows from the budget, not from the model: a MoE layer's routed experts are
paged in chunks of as many experts as fit beside everything else (`plan_chunk`), the tokens of a
layer are processed in groups whose captured states fit (`plan_group`), and the hidden-state tier
lives in memory only when it fits its share.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from surgery.errors import SurgeryError

_UNITS = {"": 1e9, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_size(text: str | None) -> int | None:
    """'450MB', '4GB', '3.5GiB', '2e9B'; a bare number is GB (like --cache-budget)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise SurgeryError(f"cannot read memory size {text!r} (use e.g. 450MB, 4GB, 3.5GiB)")
    number = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not number < 2**63:
        raise SurgeryError(f"memory size {text!r} is too large")
    value = int(number)
    if value <= 0:
        raise SurgeryError(f"memory size must be positive, got {text!r}")
    return value


def hold_heap_to_live_memory() -> None:
    """Make freed memory go back to the system at once (glibc): allocations of 1 MB and more are mapped
    and unmapped on their own instead of reusing a heap that only grows. glibc raises its mmap
    threshold after each large free (up to 32 MB), so a layer's transient tensors stay in the heap and
    RSS drifts up to the worst fragmentation, not the live bytes: measured on the 24-layer benchmark,
    503 MB peak anonymous memory against 350-382 MB with a fixed threshold, for 1.3-1.7x the wall time
    (pages of new tensors are faulted in each time). Used when the user sets a budget; elsewhere a
    no-op."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 1 << 20)
    mallopt(m_trim_threshold, 1 << 20)
    global _malloc_trim
    _malloc_trim = getattr(libc, "malloc_trim", None)


_malloc_trim = None


def release_free_memory() -> None:
    """Between layers under a user's budget: collect garbage and hand the heap's free pages back (glibc
    `malloc_trim`), so what a layer freed is not still counted against the next one."""
    if _malloc_trim is not None:
        import gc

        gc.collect()
        _malloc_trim(0)


def _meminfo(key: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def available_memory() -> int:
    return _meminfo("MemAvailable")


def rss_anon(pid: int | None = None) -> int:
    """Anonymous resident bytes of a process (this one by default): what the budget bounds."""
    try:
        with open(f"/proc/{pid or os.getpid()}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# What a run keeps free under its budget for things that are not planned (allocator slack, transient
# temporaries of library calls): a fraction of the budget, at least this many bytes.
MARGIN_FRACTION = 0.04
MARGIN_MIN = 16 * 2**20


@dataclass
class MemoryBudget:
    """Bytes a run may hold on the host (and on the GPU, `device_total`); `given`: set by the user."""

    total: int
    given: bool
    device_total: int | None = None

    @classmethod
    def resolve(cls, size: int | None, device=None) -> MemoryBudget:
        """The user's budget, or one derived from the memory available now."""
        device_total = None
        if device is not None and getattr(device, "type", "cpu") == "cuda":
            import torch

            free, _ = torch.cuda.mem_get_info(device)
            device_total = size if size is not None else int(0.9 * free) + torch.cuda.memory_allocated(device)
        if size is not None:
            return cls(size, True, device_total)
        # what this process holds already plus 80% of what the machine has free
        return cls(rss_anon() + int(0.8 * available_memory()), False, device_total)

    @property
    def margin(self) -> int:
        return max(MARGIN_MIN, int(MARGIN_FRACTION * self.total))

    def host_free(self) -> int:
        """Bytes still allowed on the host now (budget minus what the process holds, minus margin)."""
        return self.total - rss_anon() - self.margin

    def device_free(self, device) -> int:
        import torch

        assert self.device_total is not None
        return self.device_total - torch.cuda.memory_allocated(device) - max(MARGIN_MIN, self.device_total // 20)


@dataclass(frozen=True)
class ChunkPlan:
    """How one MoE layer runs under the budget."""

    experts_per_chunk: int  # == num_experts: one chunk, computed inside a single pass
    tokens_per_group: int  # tokens captured at once when paging (every token when it fits)


def plan_chunk(free_compute: int, free_host: int, expert_compute: int, expert_raw: int, num_experts: int,
               activations: int, on_device: bool, where: object = None, build: int = 1,
               budget_total: int | None = None, batched: bool = False) -> int:
    """Experts per chunk read from disk: two staging halves of raw bytes (the chunk being computed and
    the one read ahead) on the host, plus the compute buffers of the `build` experts dequantised at
    once where the compute runs (on the CPU both are host memory). A chunk is dequantised `build`
    experts at a time, so the budget buys larger reads, not more float copies of weights; `batched`:
    every expert of a chunk is built at once (a pass that works across experts), so each one costs its
    compute buffer (`expert_compute`, with what the pass holds per expert) as well."""
    fixed = (0 if batched else build * expert_compute) + activations
    if on_device and batched:
        n = min(free_host // max(2 * expert_raw, 1), max(free_compute - fixed, 0) // max(expert_compute, 1))
    elif on_device:
        n = free_host // max(2 * expert_raw, 1) if free_compute >= fixed else 0
    else:
        n = (free_host - fixed) // max(2 * expert_raw + (expert_compute if batched else 0), 1)
    if n < 1:
        need = fixed + 2 * expert_raw + (expert_compute if batched else 0)
        short = need - min(free_host, free_compute)
        to = f" to at least {(budget_total + short) / 1e6 * 1.02 + 1:.0f} MB" if budget_total else ""
        raise SurgeryError(f"the memory budget leaves {max(min(free_host, free_compute), 0) / 1e6:.0f} MB for "
                           f"routed experts, and one expert needs {need / 1e6:.0f} MB (its weights, staging and "
                           f"the layer's activations); raise --memory-budget{to}", where)
    return int(min(n, num_experts))
