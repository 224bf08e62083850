"""Process memory on Linux for the CPU benchmarks: peak resident set size (VmHWM) and the RAM still available."""

from __future__ import annotations


def _kib_field(path: str, name: str) -> int:
    """``name:`` of a /proc file in bytes (the kernel writes kB), 0 when absent."""
    with open(path) as handle:
        for line in handle:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter of this process (write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss() -> int:
    """Peak resident set size of this process since start or the last `reset_peak_rss`, in bytes."""
    return _kib_field("/proc/self/status", "VmHWM")


def mem_available() -> int:
    """RAM the kernel could give without swapping, in bytes."""
    return _kib_field("/proc/meminfo", "MemAvailable")
