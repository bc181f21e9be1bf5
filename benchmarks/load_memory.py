"""Peak CPU memory and time of loading a 4x7B-layer-shaped Mixtral for training: moekit's streaming loader vs the rest.

    python benchmarks/load_memory.py [--layers 8] [--layout legacy|fused] [--steps 6] [--work DIR]   # on a GPU machine
    python benchmarks/load_memory.py --tiny                                                           # CPU smoke run

Writes a random-weight Mixtral (hidden 4096, intermediate 14336, 4 experts, 32 heads / 8 KV heads, vocab 32000)
of `--layers` layers as bf16 safetensors shards (8 layers: 5.98B parameters, 11.95 GB), in the layout
transformers' `save_pretrained` and `moekit build` write (`block_sparse_moe.experts.E.w1/w2/w3`) or the fused one
mergekit-moe writes (`mlp.experts.gate_up_proj`), with a tokenizer and a small chat dataset. Then, each in its own
process on the GPU, it measures:
- moekit streaming: `moekit.finetune.loading.load_for_training(bits=4)`, what `moekit finetune` loads with;
- plain bitsandbytes: `from_pretrained(..., BitsAndBytesConfig(load_in_4bit=True, nf4, double quant), device_map="cuda")`
  (attention in 4-bit, experts left in bf16: the reference for load time);
- old moekit loader: `from_pretrained(..., device_map="cpu")` + `quantize_moe` (moekit <= 0.1.0);
- moekit finetune: the whole `moekit finetune CKPT --data chat.jsonl --max-steps 6 --target attn,experts --packing`.
Peak RSS is the kernel's figure for each child (wait4's ru_maxrss); this parent never imports torch, so what a child
inherits from it at the fork is negligible. The checkpoint was just written, so every run reads it from the page
cache; mapped pages a process reads count in its RSS either way. Prints a Markdown table and the issue's targets:
finetune peak RSS <= max(4 GB, 0.25x checkpoint); streaming load time <= plain bitsandbytes load time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "4x7b": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8},
    "tiny": {"vocab_size": 384, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2},
}


# --- children (each run as `load_memory.py --child KIND CKPT`) ----------------------------------------------


def write_checkpoint(path: Path, shape: str, layers: int, layout: str) -> None:
    """Random bf16 weights (std 0.02, norms 1), generated on the GPU if there is one, streamed to disk tensor by tensor."""
    import torch
    from transformers import MixtralConfig

    from moekit.build.arch.base import PlannedTensor
    from moekit.build.writer import write_sharded
    from moekit.testing import make_tokenizer

    settings = SHAPES[shape]
    config = MixtralConfig(**settings, num_hidden_layers=layers, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=4096,
                           bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)  # fmt: skip
    config.architectures = ["MixtralForCausalLM"]
    config.dtype = torch.bfloat16
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * hidden // config.num_attention_heads
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device).manual_seed(0)

    def random(*size):
        return lambda: (torch.randn(size, device=device, generator=generator, dtype=torch.bfloat16) * 0.02).cpu()

    def ones(*size):
        return lambda: torch.ones(size, dtype=torch.bfloat16)

    tensors = [PlannedTensor("model.embed_tokens.weight", (vocab, hidden), "random", random(vocab, hidden))]
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        tensors += [
            PlannedTensor(prefix + "input_layernorm.weight", (hidden,), "ones", ones(hidden)),
            PlannedTensor(prefix + "post_attention_layernorm.weight", (hidden,), "ones", ones(hidden)),
        ]
        for name, out in (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv), ("o_proj", hidden)):
            tensors.append(PlannedTensor(prefix + f"self_attn.{name}.weight", (out, hidden), "random", random(out, hidden)))
        if layout == "fused":
            tensors += [
                PlannedTensor(prefix + "mlp.gate.weight", (4, hidden), "random", random(4, hidden)),
                PlannedTensor(prefix + "mlp.experts.gate_up_proj", (4, 2 * inter, hidden), "random", random(4, 2 * inter, hidden)),
                PlannedTensor(prefix + "mlp.experts.down_proj", (4, hidden, inter), "random", random(4, hidden, inter)),
            ]
        else:
            tensors.append(PlannedTensor(prefix + "block_sparse_moe.gate.weight", (4, hidden), "random", random(4, hidden)))
            for expert in range(4):
                for name, size in (("w1", (inter, hidden)), ("w2", (hidden, inter)), ("w3", (inter, hidden))):
                    tensors.append(PlannedTensor(prefix + f"block_sparse_moe.experts.{expert}.{name}.weight", size, "random", random(*size)))
    tensors += [PlannedTensor("model.norm.weight", (hidden,), "ones", ones(hidden)),
                PlannedTensor("lm_head.weight", (vocab, hidden), "random", random(vocab, hidden))]  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    write_sharded(tensors, path, dtype=torch.bfloat16, shard_size=5 * 10**9)
    config.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    # varied text, so that the random routers send tokens to every expert within a few steps
    rng = __import__("random").Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(rng.randint(2, 9))) for _ in range(2000)]
    rows = [{"messages": [{"role": "user", "content": " ".join(rng.choices(words, k=40))},
                          {"role": "assistant", "content": " ".join(rng.choices(words, k=120))}]}
            for _ in range(256)]  # fmt: skip
    (path / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def load(kind: str, path: Path) -> dict:
    """Load the checkpoint the `kind` way; returns seconds and GPU memory held."""
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    start = time.perf_counter()
    if kind == "streaming":
        from moekit.finetune.loading import load_for_training

        model = load_for_training(path, bits=4, compute_dtype=torch.bfloat16, device_map={"": device})
    elif kind == "plain":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": device})
    elif kind == "old":
        from transformers import AutoModelForCausalLM

        from moekit.finetune.quantize import quantize_moe

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cpu")
        quantize_moe(model, bits=4, compute_dtype=torch.bfloat16, device=device)
    else:
        raise ValueError(kind)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"load_seconds": seconds, "gpu_gb": torch.cuda.memory_allocated() / 1e9 if cuda else None, "parameters": sum(p.numel() for p in model.parameters())}


# --- parent -------------------------------------------------------------------------------------------------


def run(command: list[str]) -> tuple[float, float, dict]:
    """(wall seconds, peak RSS GB, the child's last JSON line or {}) of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    output, errors = process.stdout.read(), process.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{errors[-4000:]}\n{output[-2000:]}")
    last = next((line for line in reversed(output.splitlines()) if line.startswith('{"')), "{}")
    return wall, usage.ru_maxrss * 1024 / 1e9, json.loads(last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers [default: 8; --tiny: 4]")
    parser.add_argument("--layout", choices=["legacy", "fused"], default="legacy")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps of the finetune run")
    parser.add_argument("--work", type=Path, default=Path("/tmp/moekit-load-bench"))
    parser.add_argument("--tiny", action="store_true", help="a small shape on the CPU (smoke test)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["streaming", "plain", "old", "finetune"], help="runs to leave out")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "CKPT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = "tiny" if args.tiny else "4x7b"
    layers = args.layers or (4 if args.tiny else 8)
    if args.child:
        kind, path = args.child[0], Path(args.child[1])
        if kind == "write":
            write_checkpoint(path, shape, layers, args.layout)
        else:
            print(json.dumps(load(kind, path)))
        return

    checkpoint = args.work / f"mixtral-{shape}-{layers}L-{args.layout}"
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--layers", str(layers), "--layout", args.layout] + (["--tiny"] if args.tiny else [])
    if not (checkpoint / "config.json").is_file():
        shutil.rmtree(checkpoint, ignore_errors=True)
        wall, _, _ = run(me + common + ["--child", "write", str(checkpoint)])
        print(f"wrote {checkpoint} in {wall:.0f} s", flush=True)
    size_gb = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")) / 1e9
    results: dict[str, tuple[float, float, dict]] = {}
    for kind in ("streaming", "plain", "old"):
        if kind not in args.skip:
            results[kind] = run(me + common + ["--child", kind, str(checkpoint)])
            print(f"{kind}: {results[kind]}", flush=True)
    if "finetune" not in args.skip:
        out = args.work / "finetune-out"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
        command = [sys.executable, "-m", "moekit", "finetune", str(checkpoint), "--data", str(checkpoint / "chat.jsonl"), "-o", str(out),
                   "--max-steps", str(args.steps), "--target", "attn,experts", "--packing"] + (["--max-seq-len", "256"] if args.tiny else [])  # fmt: skip
        results["finetune"] = run(command)
        shutil.rmtree(out, ignore_errors=True)
        print(f"finetune: {results['finetune'][:2]}", flush=True)

    import platform

    names = {"streaming": "moekit streaming load (bits 4)", "plain": "plain bitsandbytes 4-bit from_pretrained",
             "old": "old moekit loader (CPU bf16 + quantize_moe)",
             "finetune": f"`moekit finetune` ({args.steps} steps, attn+experts, packing)"}  # fmt: skip
    print(
        f"\ncheckpoint: Mixtral {shape} shape, {layers} layers, {args.layout} layout, "
        f"{size_gb:.2f} GB bf16 safetensors; {platform.node()}, {os.cpu_count()} CPUs\n"
    )
    print("| run | wall (s) | load (s) | peak RSS (GB) | peak RSS / checkpoint | GPU memory after load (GB) |\n|---|---:|---:|---:|---:|---:|")
    for kind, (wall, rss, child) in results.items():
        load_s = f"{child['load_seconds']:.1f}" if "load_seconds" in child else ""
        gpu = f"{child['gpu_gb']:.2f}" if child.get("gpu_gb") is not None else ""
        print(f"| {names[kind]} | {wall:.1f} | {load_s} | {rss:.2f} | {rss / size_gb:.2f}x | {gpu} |")
    if "finetune" in results:
        bound = max(4.0, 0.25 * size_gb)
        rss = results["finetune"][1]
        print(f"\ntarget: finetune peak RSS {rss:.2f} GB <= max(4 GB, 0.25x checkpoint) = {bound:.2f} GB: {'met' if rss <= bound else 'NOT met'}")
    if "streaming" in results and "plain" in results:
        mine, theirs = results["streaming"][2]["load_seconds"], results["plain"][2]["load_seconds"]
        print(f"target: streaming load {mine:.1f} s <= plain bitsandbytes load {theirs:.1f} s: {'met' if mine <= theirs else 'NOT met'}")
    if not args.keep:
        shutil.rmtree(checkpoint, ignore_errors=True)


if __name__ == "__main__":
    main()
