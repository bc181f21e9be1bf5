"""The forward and backward pass of a training step captured once as a CUDA graph, and replayed for every batch.

A QLoRA step on a 4-bit MoE launches about 14,000 small kernels (per layer: attention, norms, routing, the grouped
expert GEMMs, LoRA), and the host needs about as long to launch them as the GPU needs to run them. Replaying a CUDA
graph launches all of them with one call. moekit's expert block keeps every shape static and never waits for the
host (grouped GEMMs over device-side offsets), so the whole step can be captured.

    step = CapturedStep(step_fn, params)   # step_fn(batch) -> {"loss": scalar, other tensors}; params: what trains
    for batch in batches:                  # same keys, shapes and dtypes every time
        outputs = step(batch)              # gradients are in p.grad, as after outputs["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()

The first call runs eagerly on a side stream (kernels that set themselves up at their first call must not do so
during capture). The first call after it that starts from zero gradients (every p.grad None) captures the graph,
then replays it; later such calls copy the batch into the graph's input tensors and replay. The returned tensors
are the graph's own: read or copy them before the next call.

Gradients behave as with eager backward passes:
- a call that finds every p.grad None (after `zero_grad(set_to_none=True)`) replays the *fresh* graph. Its
  backward allocated the gradients inside the graph's memory pool during capture, as eager autograd does, so
  they take no memory before the backward pass;
- a call that finds gradients (gradient accumulation) replays a second, *accumulating* graph, captured at its
  first use in the same memory pool, whose backward adds to the fresh graph's gradient tensors in place.

On the CPU every call runs eagerly. A batch whose shapes differ from the captured one runs eagerly (`eager_steps`
counts those). So does every call after a capture failed (`failure` says why: an operation that cannot be captured).
After a failed capture, torch 2.11 leaves the CUDA random generator in its capture state, so nothing that draws
random numbers on the GPU may run in the process afterwards (moekit captures only steps without dropout). `step_fn`
must not synchronise with the host (no `.item()`, no shapes that depend on values), and checkpointed layers must not
save the CUDA RNG state (`quantize.enable_checkpointing(model, preserve_rng_state=False)`). A replay re-runs the
kernels, not the Python code around them: Python side effects of `step_fn` happen at capture only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class CapturedStep:
    def __init__(self, step_fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], params: list[nn.Parameter]):
        self.step_fn = step_fn
        self.params = list(params)
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}  # accumulating? -> graph
        self.outputs: dict[bool, dict[str, torch.Tensor]] = {}
        self.static_batch: dict[str, torch.Tensor] | None = None
        self.grads: list[torch.Tensor | None] = []  # the fresh graph's gradient tensors (None: no gradient reached it)
        self.replays = 0
        self.eager_steps = 0
        self.failure: str | None = None
        self._warmed_up = False

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        fresh = all(p.grad is None for p in self.params)
        if not self.params[0].is_cuda:  # CPU: the same step, eagerly
            return self._eager_step(batch)
        if not self._warmed_up:
            return self._warm_up(batch)
        if self.failure is not None:
            return self._eager_step(batch)
        if not self.graphs and not fresh:  # the fresh graph comes first: it owns the gradient tensors
            return self._eager_step(batch)
        if self.static_batch is not None and not self._fits(batch):
            return self._eager_step(batch)
        accumulate = not fresh
        if accumulate:
            self._attach_grads()
        if accumulate not in self.graphs:
            try:
                self._capture(batch, accumulate)
            except RuntimeError as error:  # an operation that cannot be captured: this and later steps run eagerly
                self.failure = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                self.graphs.clear()
                if fresh:  # gradients the aborted capture assigned hold nothing yet
                    for param in self.params:
                        param.grad = None
                return self._eager_step(batch)
        for name, tensor in batch.items():
            self.static_batch[name].copy_(tensor, non_blocking=True)
        self.graphs[accumulate].replay()
        if not accumulate:
            for param, grad in zip(self.params, self.grads):
                param.grad = grad
        self.replays += 1
        return self.outputs[accumulate]

    def _run(self, batch) -> dict[str, torch.Tensor]:
        outputs = self.step_fn(batch)
        outputs["loss"].backward()
        return {name: tensor.detach() for name, tensor in outputs.items()}

    def _eager_step(self, batch):
        self.eager_steps += 1
        return self._run(batch)

    def _warm_up(self, batch):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = self._eager_step(batch)
        torch.cuda.current_stream().wait_stream(side)
        self._warmed_up = True
        return outputs

    def _capture(self, batch, accumulate: bool) -> None:
        if self.static_batch is None:  # outside the graphs' pool: both graphs read them
            self.static_batch = {name: tensor.clone() for name, tensor in batch.items()}
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        stream = torch.cuda.current_stream()
        try:
            # the accumulating graph shares the fresh graph's pool: the two never run at once, and the fresh
            # graph's gradients (alive) are never handed out again. Thread-local capture mode: other threads (NCCL's
            # watchdog, polling the events of earlier all-reduces) may go on querying the GPU meanwhile.
            with torch.cuda.graph(graph, pool=self.graphs[False].pool() if accumulate else None, capture_error_mode="thread_local"):
                self.outputs[accumulate] = self._run(self.static_batch)
        finally:
            torch.cuda.set_stream(stream)  # a capture that fails to end leaves its own stream current
        self.graphs[accumulate] = graph
        if not accumulate:
            self.grads = [param.grad for param in self.params]

    def _attach_grads(self) -> None:
        """Before an accumulating replay: every p.grad is the fresh graph's tensor, holding what was accumulated so
        far (zero where p.grad was None, a copy where an eager step put a gradient elsewhere)."""
        for param, grad in zip(self.params, self.grads):
            if grad is None or param.grad is grad:
                continue
            if param.grad is None:
                grad.zero_()
            else:
                grad.copy_(param.grad)
            param.grad = grad

    def _fits(self, batch) -> bool:
        static = self.static_batch
        return batch.keys() == static.keys() and all(t.shape == static[k].shape and t.dtype == static[k].dtype for k, t in batch.items())
