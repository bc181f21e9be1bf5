"""Streaming sharded safetensors writer: every tensor goes to disk as soon as it is made.

mergekit's `TensorWriter` keeps a whole shard in memory and safetensors' `save_file` copies it to
bytes once more before writing, so a 2 GB shard costs about 4 GB of RAM. A build knows every
output tensor's name, shape and dtype before loading any of them (`PlannedTensor`), so it can
write each shard's header first and then stream the tensors in, holding one tensor at a time.
The files are named as transformers and mergekit name them: `model.safetensors` when one shard
holds everything, else `model-0000N-of-0000M.safetensors` with `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moekit.build.arch.base import PlannedTensor

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
INDEX_FILE = "model.safetensors.index.json"


def plan_shards(tensors: Sequence[PlannedTensor], dtype: torch.dtype, shard_size: int) -> list[list[PlannedTensor]]:
    """Split `tensors`, in order, into shards of at most `shard_size` bytes (a bigger tensor gets its own)."""
    item_size = torch.empty((), dtype=dtype).element_size()
    shards: list[list[PlannedTensor]] = [[]]
    used = 0
    for tensor in tensors:
        size = math.prod(tensor.shape) * item_size
        if shards[-1] and used + size > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(tensor)
        used += size
    return shards


def write_sharded(tensors: Sequence[PlannedTensor], out: Path, *, dtype: torch.dtype, shard_size: int) -> dict[str, str]:
    """Write `tensors` as safetensors shards (plus an index when there are several) into `out`; returns the weight map."""
    item_size = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards(tensors, dtype, shard_size)
    weight_map: dict[str, str] = {}
    total_size = 0
    with tqdm(total=len(tensors), desc="writing tensors", unit="tensor") as progress:
        for number, shard in enumerate(shards, start=1):
            file_name = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for tensor in shard:
                size = math.prod(tensor.shape) * item_size
                header[tensor.name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
                offset += size
            header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
            header_bytes += b" " * (-len(header_bytes) % 8)  # the format aligns the data to 8 bytes
            with open(out / file_name, "wb") as file:
                file.write(struct.pack("<Q", len(header_bytes)))
                file.write(header_bytes)
                for planned in shard:
                    data = planned.load()
                    if data.dtype != dtype or tuple(data.shape) != tuple(planned.shape):
                        raise RuntimeError(f"{planned.name}: planned {dtype} {tuple(planned.shape)}, made {data.dtype} {tuple(data.shape)}")
                    file.write(data.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                    weight_map[planned.name] = file_name
                    progress.update()
            total_size += offset
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")
    return weight_map
