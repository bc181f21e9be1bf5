"""What should `moekit export` add the LoRA delta to: the base's original weights, or the quantized weights it was
trained against (dequantized)? Measured on the demo's own fine-tune, against the trained model itself.

The demo (`moekit.demo.run_demo`) builds its MoE from the zoo and QLoRA-finetunes it (`--bits 4`). With `--bits 8`
the same fine-tune (the demo's recorded options, `bits=8`) is run again on the same MoE and data. For each fine-tune
the held-out sets of the demo (`chat`, `mixed`, `json`) are scored, as `moekit eval` scores them, for:

- the base MoE before training, unquantized and quantized as in training (what the NF4 / int8 error alone costs);
- the trained model: the base quantized as in training with the adapter attached (the routers the adapter carries).
  Its 4-bit layers compute as in training (dequantized to float32), not through bitsandbytes' bf16 CPU inference
  kernel, which repacks the weights at the first eval-mode forward on avx512_bf16 CPUs;
- `moekit export --merge-into original` and `--merge-into dequantized`, the written checkpoints loaded with plain
  transformers.

Perplexity, and the mean per-token KL divergence from the trained model's next-token distribution on `mixed`
(how far the export is from what was trained). Everything on the CPU in float32, a few minutes per preset.

    python benchmarks/export_semantics.py --work /tmp/export-semantics                      # quick and standard presets, 4 and 8 bits
    python benchmarks/export_semantics.py --work /tmp/es --presets quick --bits 4           # one preset, one fine-tune
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

SETS = ("chat", "mixed", "json")
KL_SET = "mixed"


def demo_dir(work: Path, preset: str) -> Path:
    """The demo's output for `preset` under `work`, run now unless it is there."""
    from moekit.demo import run_demo

    out = work / f"demo-{preset}"
    if not (out / "report.json").is_file():
        run_demo(out, preset=preset, overwrite=True, echo=lambda line: print(f"  demo: {line}", file=sys.stderr))
    return out


def finetune_dir(demo: Path, work: Path, preset: str, bits: int) -> Path:
    """The demo's own fine-tune for 4 bits; for other bits, the same fine-tune (its recorded options) at `bits`."""
    from moekit.finetune.export import base_model_path, read_finetune
    from moekit.finetune.options import FinetuneOptions
    from moekit.finetune.trainer import finetune

    metadata = read_finetune(demo / "finetune")
    if metadata["options"]["bits"] == bits:
        return demo / "finetune"
    out = work / f"finetune-{preset}-{bits}bit"
    if not (out / "moekit-finetune.json").is_file():
        options = FinetuneOptions(**{**metadata["options"], "bits": bits})
        finetune(base_model_path(metadata), out, options, echo=lambda line: print(f"  finetune: {line}", file=sys.stderr))
    return out


def trained_model(finetune: Path, with_adapter: bool = True):
    """The base quantized as in training with the adapter attached (or without), computing as in training."""
    from moekit.finetune.adapter import load_adapter
    from moekit.finetune.export import ROUTERS_FILE, base_model_path, read_finetune
    from moekit.finetune.loading import load_for_training
    from moekit.finetune.targets import load_routers

    metadata = read_finetune(finetune)
    model = load_for_training(base_model_path(metadata), bits=metadata["options"]["bits"], compute_dtype=torch.float32, device_map={"": "cpu"})
    if with_adapter:
        model, counts = load_adapter(model, finetune / "adapter")
        if not counts["routers"] and (finetune / ROUTERS_FILE).is_file():
            load_routers(model, finetune / ROUTERS_FILE)
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False  # float32 dequantize + matmul, as in training
    return model.eval()


def plain_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def score(model, tokenizer, texts: dict[str, list[str]], max_length: int, reference: list[torch.Tensor] | None):
    """({set: perplexity}, mean per-token KL(reference || model) on KL_SET or None, this model's log-probs on KL_SET)."""
    from moekit.eval.metrics import batches, encode, perplexity, prefix_token_id

    ppl = {name: perplexity(model, tokenizer, texts[name], batch_size=8, max_length=max_length).perplexity for name in SETS}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix_token_id(tokenizer)
    log_probs = []
    for _chunk, input_ids, attention_mask in batches(encode(tokenizer, texts[KL_SET], max_length), 8, pad_id):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()  # (batch, seq, vocab)
        log_probs.append(F.log_softmax(logits, dim=-1)[attention_mask.bool()])  # (tokens, vocab)
    kl = None
    if reference is not None:
        total = sum(F.kl_div(ours, theirs, log_target=True, reduction="sum").item() for ours, theirs in zip(log_probs, reference, strict=True))
        kl = total / sum(len(ours) for ours in log_probs)
    return ppl, kl, log_probs


def measure(work: Path, preset: str, bits_list: list[int]) -> list[dict]:
    from transformers import AutoTokenizer

    from moekit.eval.data import load_set, render
    from moekit.finetune.export import base_model_path, export, read_finetune

    demo = demo_dir(work, preset)
    report = json.loads((demo / "report.json").read_text(encoding="utf-8"))
    max_length = report["demo"]["zoo"]["settings"]["seq_len"]  # as the demo scores: up to the zoo's trained length
    base = base_model_path(read_finetune(demo / "finetune"))
    tokenizer = AutoTokenizer.from_pretrained(demo / "finetune" / "adapter")  # the chat template used in training
    texts = {name: [render(d, tokenizer) for d in load_set(name, str(demo / "data" / f"{name}.jsonl")).documents] for name in SETS}

    rows = []
    for bits in bits_list:
        finetune = finetune_dir(demo, work, preset, bits)
        print(f"{preset}, {bits}-bit: scoring", file=sys.stderr)
        ppl, _kl, reference = score(trained_model(finetune), tokenizer, texts, max_length, None)
        rows.append({"preset": preset, "bits": bits, "model": f"{bits}-bit + adapter (trained model)", "ppl": ppl, "kl": None, "reference": True})
        for merge_into in ("original", "dequantized"):
            out = work / f"export-{preset}-{bits}bit-{merge_into}"
            export(finetune, out, merge_into=merge_into, overwrite=True)
            ppl, kl, _ = score(plain_model(out), tokenizer, texts, max_length, reference)
            rows.append({"preset": preset, "bits": bits, "model": f"export, merged into {merge_into}", "ppl": ppl, "kl": kl})
        ppl, kl, _ = score(plain_model(base), tokenizer, texts, max_length, reference)
        rows.append({"preset": preset, "bits": bits, "model": "base MoE, before training", "ppl": ppl, "kl": kl})
        ppl, kl, _ = score(trained_model(finetune, with_adapter=False), tokenizer, texts, max_length, reference)
        rows.append({"preset": preset, "bits": bits, "model": f"base MoE at {bits} bits, before training", "ppl": ppl, "kl": kl})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| preset | bits | model | " + " | ".join(f"ppl {name}" for name in SETS) + f" | KL to trained ({KL_SET}, nats/token) |",
        "|---|---:|---|" + "---:|" * (len(SETS) + 1),
    ]
    for row in rows:
        reference = next(r for r in rows if r["preset"] == row["preset"] and r["bits"] == row["bits"] and r.get("reference"))
        cells = [f"{row['ppl'][name]:.3f}" + ("" if row is reference else f" ({row['ppl'][name] / reference['ppl'][name] - 1:+.2%})") for name in SETS]
        kl = "–" if row is reference else f"{max(row['kl'], 0.0):.1e}"  # float noise makes an exact match slightly negative
        lines.append(f"| {row['preset']} | {row['bits']} | {row['model']} | " + " | ".join(cells) + f" | {kl} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="Directory for the demo runs, fine-tunes and exports (reused when present).")
    parser.add_argument("--presets", default="quick,standard", help="Comma list of demo presets.")
    parser.add_argument("--bits", default="4,8", help="Comma list of training bits (4: the demo's own fine-tune).")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: as the demo, one intra-op thread
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [row for preset in args.presets.split(",") for row in measure(args.work.absolute(), preset, [int(b) for b in args.bits.split(",")])]
    (args.work / "export_semantics.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print(markdown(rows))
    assert all(math.isfinite(v) for row in rows for v in row["ppl"].values())


if __name__ == "__main__":
    main()
