"""GPU time of a profiled stretch: the union of its kernels' intervals (kernels that overlap, on other streams, count
once). Summing `self_device_time_total` over `key_averages()` counts each kernel under its op and again on its own
row, about twice the real time."""

from __future__ import annotations


def busy_intervals(profiler, skip: str | None = None) -> list[tuple[float, float]]:
    """(start, end) in microseconds of each stretch during which at least one kernel ran, in order (kernels whose name
    contains `skip` left out)."""
    merged: list[tuple[float, float]] = []
    for begin, end in sorted(
        (event.time_range.start, event.time_range.end)
        for event in profiler.events()
        if event.device_type.name == "CUDA" and not (skip and skip in event.name.lower())
    ):
        if merged and begin <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((begin, end))
    return merged


def kernel_seconds(profiler, skip: str | None = None) -> float:
    """Seconds during which at least one kernel ran (kernels whose name contains `skip` left out)."""
    return sum(end - begin for begin, end in busy_intervals(profiler, skip)) / 1e6


def idle_gaps(profiler) -> list[tuple[float, float]]:
    """(length, start) in microseconds of each stretch between the first and the last kernel when none ran."""
    busy = busy_intervals(profiler)
    return [(begin - previous_end, previous_end) for (_, previous_end), (begin, _) in zip(busy, busy[1:])]
