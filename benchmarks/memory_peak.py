"""What is allocated at a CUDA memory peak, and when it was allocated: read from torch's allocator trace.

    torch.cuda.memory._record_memory_history(max_entries=2_000_000, context=None)
    baseline = torch.cuda.memory_allocated()
    ...                                   # the steps to look at
    report = peak_report(torch.cuda.memory._snapshot(), baseline)
    torch.cuda.memory._record_memory_history(enabled=None)

Allocations made before the recording began (weights, LoRA parameters) are the baseline; the report lists the
tensors allocated since that are alive at the highest point, grouped by size and by when they were allocated (the
fraction of the trace's allocations made before). The trace records no stacks: with torch 2.11, recording Python
stacks fails inside a checkpoint's recomputation ("SystemError: error return without exception set"). Sizes name the
tensors well enough (a (rows, 2I) bf16 product, one dequantized projection).
"""

from __future__ import annotations

from collections import defaultdict


def _events(snapshot: dict) -> list[dict]:
    return [event for trace in snapshot["device_traces"] for event in trace]


def peak_report(snapshot: dict, baseline: int, top: int = 25) -> str:
    events = _events(snapshot)
    sizes: dict[int, int] = {}
    total = peak = 0
    peak_index = -1
    for index, event in enumerate(events):  # first pass: when is the highest point
        if event["action"] == "alloc":
            sizes[event["addr"]] = event["size"]
            total += event["size"]
            if total > peak:
                peak, peak_index = total, index
        elif event["action"] == "free_completed" and event["addr"] in sizes:
            total -= sizes.pop(event["addr"])
    live_at: dict[int, int] = {}  # address -> index of its allocation
    for index, event in enumerate(events[: peak_index + 1]):  # second pass: what is alive then
        if event["action"] == "alloc":
            live_at[event["addr"]] = index
        elif event["action"] == "free_completed":
            live_at.pop(event["addr"], None)
    live = {index: events[index] for index in live_at.values()}
    groups: dict[str, list[int]] = defaultdict(list)
    allocations = [index for index, event in enumerate(events) if event["action"] == "alloc"]
    order = {index: position / len(allocations) for position, index in enumerate(allocations)}
    for index, event in live.items():
        groups[f"{event['size'] / 1e6:9.1f} MB each, at {order[index]:.0%} of the trace"].append(event["size"])
    lines = [
        f"baseline (allocated before the trace) {baseline / 1e9:.3f} GB + at the peak {peak / 1e9:.3f} GB"
        f" = {(baseline + peak) / 1e9:.3f} GB; {len(live)} tensors alive from the trace",
        "",
        "      GB  count  size, allocated at",
    ]
    for where, group in sorted(groups.items(), key=lambda item: -sum(item[1]))[:top]:
        lines.append(f"{sum(group) / 1e9:8.3f} {len(group):6d}  {where}")
    if peak_index >= 0:
        position = order[peak_index]
        lines += ["", f"the allocation that made the peak ({position:.0%} of the trace): {events[peak_index]['size'] / 1e9:.3f} GB"]
    return "\n".join(lines)
