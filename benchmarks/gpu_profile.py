"""GPU time of a profiled stretch: the union of its kernels' intervals (kernels that overlap, on other streams, count
once). Summing `self_device_time_total` over `key_averages()` counts each kernel under its op and again on its own
row, about twice the real time."""

from __future__ import annotations


def kernel_seconds(profiler, skip: str | None = None) -> float:
    """Seconds during which at least one kernel ran (kernels whose name contains `skip` left out)."""
    intervals = sorted(
        (event.time_range.start, event.time_range.end)
        for event in profiler.events()
        if event.device_type.name == "CUDA" and not (skip and skip in event.name.lower())
    )
    busy_us, reach = 0.0, float("-inf")
    for begin, end in intervals:
        if end > reach:
            busy_us += end - max(begin, reach)
            reach = end
    return busy_us / 1e6
