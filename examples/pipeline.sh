#!/usr/bin/env bash
# Every moekit stage on the demo's tiny zoo, offline on a CPU (a few minutes once the zoo is cached;
# `moekit demo` or the first `moekit build` below makes it). Run from the repository root:
#   bash examples/pipeline.sh [WORK_DIR]
set -euo pipefail
work=${1:-pipeline-out}
rm -rf "$work" && mkdir -p "$work"

# 1. build: four zoo experts -> a Mixtral MoE (gate_mode calibrated), with its routing report and model card
moekit build recipes/tiny-4x.yaml -o "$work/moe"

# 2. plan: what the fine-tune below will need on a 16 GB GPU (reads config.json only)
moekit plan "$work/moe" --target attn,experts,gate --experts 0,2 --lora-r 8 --batch-size 4 --max-seq-len 128 --gpu-memory 16GB

# 3. finetune: QLoRA (NF4 experts) on a small chat set, LoRA on attention and experts 0 and 2, routers trained
moekit finetune "$work/moe" --data examples/chat-sample.jsonl -o "$work/chat" \
    --target attn,experts,gate --experts 0,2 --lora-r 8 --batch-size 4 --max-seq-len 128 --max-steps 20 \
    --learning-rate 1e-3 --save-steps 10

# 4. eval: the MoE, its fine-tune and every source on held-out chats (none of them in the training file), with
#    routing statistics for the MoE and for the fine-tune (its routers were trained). A set that shares examples
#    with the training data would be marked in the report and in model cards as not held out.
moekit eval "$work/moe" --adapter "$work/chat" --data chat=examples/chat-heldout.jsonl -o "$work/eval"

# 5. export: adapter + routers merged into a standard checkpoint (plain transformers loads it)
moekit export "$work/chat" -o "$work/chat-merged"

# 6. publish: what would go to the Hub, and the model card (nothing is uploaded with --dry-run); the card of the
#    MoE shows the MoE's own results next to its sources, not its fine-tune's
moekit publish "$work/moe" --repo-id you/tiny-4x --report "$work/eval" --dry-run
