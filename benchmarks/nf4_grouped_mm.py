"""The grouped GEMM that reads NF4 weights itself (`moekit/finetune/nf4_grouped_mm.py`) against what the expert block
runs by default: the NF4 kernel dequantizes the projection, then torch's grouped GEMM (`F.grouped_mm`).

For each expert projection of the benchmark shapes, both directions of the training step (x @ W^T in the forward and
its recomputation, dy @ W in the backward), every tile configuration in TILES: GPU time per call (CUDA events,
`triton.testing.do_bench`), TFLOP/s, and the largest difference from the reference relative to its largest value.
Routing is uniform (rows = tokens * top-k, the same count per expert). Prints a table and writes JSON with --out.

    python benchmarks/nf4_grouped_mm.py                       # one H100/H200, about 3 minutes
    python benchmarks/nf4_grouped_mm.py --shapes 4x7b-gate_up --tiles 256,128,64,8,3 --tiles 128,128,64,8,4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# (experts, out, in), rows: the expert projections of benchmarks/finetune_memory.py's rows (seq 1024 x batch 2, top-2)
SHAPES = {
    "4x7b-gate_up": ((4, 28672, 4096), 4096),
    "4x7b-down": ((4, 4096, 14336), 4096),
    "8x7b-gate_up": ((8, 28672, 4096), 4096),
    "phixtral-fc1": ((4, 10240, 2560), 4096),
}
# block_m, block_n, block_k, num_warps, num_stages, swap_ab (1: the weight is the first operand, out^T = W @ x^T),
# rows_first (1: the row tiles of one output column are launched together)
TILES = [
    (256, 128, 64, 8, 3, 1, 1),  # nf4_grouped_mm.CONFIGS[False]
    (256, 64, 64, 4, 3, 1, 0),  # nf4_grouped_mm.CONFIGS[True]
    (256, 128, 64, 8, 3, 0, 0),
    (256, 128, 64, 8, 3, 1, 0),
    (256, 64, 64, 4, 3, 1, 1),
    (256, 64, 64, 4, 2, 1, 1),
    (256, 128, 64, 8, 4, 1, 1),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--tiles", action="append", help="block_m,block_n,block_k,warps,stages[,swap_ab[,rows_first]] (repeatable; default: TILES)")
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    import triton.testing

    from moekit.finetune.expert_storage import NF4Storage
    from moekit.finetune.nf4_grouped_mm import KernelConfig, fits, nf4_grouped_mm

    tiles = [tuple(map(int, t.split(","))) for t in args.tiles] if args.tiles else TILES
    tiles = [KernelConfig(*t[:5], *map(bool, t[5:])) for t in tiles]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    results = []
    for name in args.shapes.split(","):
        (experts, out_features, in_features), rows = SHAPES[name]
        torch.manual_seed(0)
        storage = NF4Storage(torch.randn(experts, out_features, in_features, device="cuda", dtype=torch.bfloat16), torch.bfloat16, torch.uint8, "cuda")
        offsets = torch.full((experts,), rows // experts, dtype=torch.int32, device="cuda").cumsum(0, dtype=torch.int32)
        for transposed in (False, True):
            reduced, produced = (out_features, in_features) if transposed else (in_features, out_features)
            inputs = torch.randn(rows, reduced, device="cuda", dtype=torch.bfloat16)
            flops = 2 * rows * reduced * produced

            def dequantize_then_gemm(inputs=inputs, transposed=transposed):
                weight = storage.dequantize(torch.bfloat16)  # (experts, out, in)
                return F.grouped_mm(inputs, weight if transposed else weight.transpose(1, 2), offs=offsets)

            reference = dequantize_then_gemm()
            scale = reference.float().abs().max().item()
            candidates = [("dequantize + grouped_mm", dequantize_then_gemm)]
            for t in tiles:
                if fits(storage.shape, transposed, t):
                    label = f"in-kernel {t.block_m}x{t.block_n}x{t.block_k} w{t.num_warps} s{t.num_stages}"
                    label += (" W-first" if t.swap_ab else "") + (" rows-first" if t.rows_first else "")
                    candidates.append((label, lambda t=t, inputs=inputs, transposed=transposed: nf4_grouped_mm(inputs, storage, offsets, transposed, t)))
            for label, fn in candidates:
                start = time.perf_counter()
                try:
                    error = (fn().float() - reference.float()).abs().max().item() / scale
                    ms = triton.testing.do_bench(fn, warmup=5, rep=40)
                except Exception as exc:  # a tile that does not compile or fit in shared memory on this GPU
                    print(f"{name:14s} {transposed=} {label:40s} failed: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                row = {"shape": name, "transposed": transposed, "path": label, "ms": ms, "tflops": flops / ms / 1e9}
                row.update(max_rel_error=error, first_call_s=time.perf_counter() - start)
                results.append(row)
                direction = "dy @ W" if transposed else "x @ W^T"
                print(f"{name:14s} {direction:8s} {label:40s} {ms:8.3f} ms {row['tflops']:6.0f} TFLOP/s  error {error:.1e}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
