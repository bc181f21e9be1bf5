"""The inputs of checkpointed decoder layers kept in pinned CPU memory between the forward and the backward pass.

With gradient checkpointing every decoder layer keeps only its input for the backward pass, where it is recomputed:
(batch x seq x hidden) in bf16 per layer, about 0.54 GB for a 4x7B at seq 1024 x 2. `CheckpointInputOffload.hooks`
moves those inputs to pinned CPU buffers during the forward pass and brings each one back when its layer is
recomputed:

- the copy to the CPU runs on a side stream, beside the layer's own kernels; the main stream waits for it before the
  next layer starts, so the input's GPU memory can be reused from then on;
- the copy back runs on the main stream, right before the recomputation that needs it;
- the CPU buffers are allocated once (the first step) and reused, so the same addresses serve every step: the copies
  can be captured in a CUDA graph (`cuda_graph.CapturedStep`) like any other kernel.

    offload = CheckpointInputOffload()
    with offload.hooks(config.hidden_size):   # around the forward pass; the backward needs no context
        loss = model(**batch).loss
    loss.backward()

Only (batch, seq, hidden) activations are moved, and on the CPU nothing is.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn


class _Offloaded:
    """A saved layer input while it lives in a pinned CPU buffer; the buffer returns to the pool when this dies."""

    def __init__(self, pool: CheckpointInputOffload, buffer: torch.Tensor, device: torch.device, copied: torch.cuda.Event):
        self.buffer = buffer
        self.device = device
        self.copied = copied
        weakref.finalize(self, pool.free.append, buffer)


class CheckpointInputOffload:
    def __init__(self):
        self.free: list[torch.Tensor] = []  # pinned CPU buffers not holding a saved input
        self.stream: torch.cuda.Stream | None = None
        self.in_flight: tuple[torch.Tensor, torch.cuda.Event] | None = None  # the input being copied, kept alive until joined

    def pack(self, tensor: torch.Tensor):
        if not tensor.is_cuda:
            return tensor
        self._join()
        buffer = self._buffer(tensor)
        main = torch.cuda.current_stream()
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        self.stream.wait_stream(main)  # the layer input is written
        with torch.cuda.stream(self.stream):
            buffer.copy_(tensor, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        self.in_flight = (tensor, copied)
        return _Offloaded(self, buffer, tensor.device, copied)

    def unpack(self, saved):
        if not isinstance(saved, _Offloaded):
            return saved
        self._join()
        main = torch.cuda.current_stream()
        main.wait_event(saved.copied)
        return saved.buffer.to(saved.device, non_blocking=True)

    def _join(self) -> None:
        """The main stream waits for the last copy to the CPU; only then may its source's memory be reused."""
        if self.in_flight is not None:
            torch.cuda.current_stream().wait_event(self.in_flight[1])
            self.in_flight = None

    def _buffer(self, tensor: torch.Tensor) -> torch.Tensor:
        for index, buffer in enumerate(self.free):
            if buffer.shape == tensor.shape and buffer.dtype == tensor.dtype:
                return self.free.pop(index)
        return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)

    def hooks(self, hidden_size: int):
        """Saved-tensor hooks for a training step: every (batch, seq, hidden_size) CUDA activation saved outside the
        checkpointed layers goes to the CPU. With checkpointing on, those are the layers' inputs (a checkpoint saves
        what its layer saves under hooks of its own) and the final norm's input."""

        def pack(tensor: torch.Tensor):
            if tensor.dim() == 3 and tensor.shape[-1] == hidden_size and tensor.is_floating_point() and not isinstance(tensor, nn.Parameter):
                return self.pack(tensor)
            return tensor

        return torch.autograd.graph.saved_tensors_hooks(pack, self.unpack)
