"""The streaming shard writer writes ordinary safetensors shards and index, holding one tensor at a time."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moekit.build.arch.base import PlannedTensor
from moekit.build.writer import INDEX_FILE, write_sharded


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shards_read_back_exactly_and_respect_the_size_limit(tmp_path, dtype):
    generator = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(8 + i, 5, generator=generator).to(dtype) for i in range(7)}
    tensors["scalar_like"] = torch.randn(3, generator=generator).to(dtype)
    item = torch.empty((), dtype=dtype).element_size()
    limit = 30 * 5 * item  # about two tensors per shard
    planned = [PlannedTensor(name, tuple(t.shape), "test", lambda t=t: t) for name, t in tensors.items()]

    weight_map = write_sharded(planned, tmp_path, dtype=dtype, shard_size=limit)

    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["weight_map"] == weight_map and set(weight_map) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * item for t in tensors.values())
    read = {}
    for shard in sorted(set(weight_map.values())):
        size = sum(tensors[n].numel() * item for n, f in weight_map.items() if f == shard)
        assert size <= limit
        read.update(load_file(tmp_path / shard))
    assert len(set(weight_map.values())) > 2
    for name, tensor in tensors.items():
        assert read[name].dtype == dtype and torch.equal(read[name], tensor), name


def test_one_shard_is_model_safetensors_without_an_index(tmp_path):
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    write_sharded([PlannedTensor("w", (2, 3), "test", lambda: tensor)], tmp_path, dtype=torch.float32, shard_size=10**6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert torch.equal(load_file(tmp_path / "model.safetensors")["w"], tensor)


def test_a_tensor_that_differs_from_its_plan_is_an_error(tmp_path):
    planned = [PlannedTensor("w", (2, 3), "test", lambda: torch.zeros(3, 2))]
    with pytest.raises(RuntimeError, match="planned"):
        write_sharded(planned, tmp_path, dtype=torch.float32, shard_size=10**6)
