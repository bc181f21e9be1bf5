"""Making the zoo: a tokenizer, a tiny Llama base pretrained on all domains, one expert per domain.

Experts are fine-tuned from the base with only their MLP weights trainable. That is the situation
an MoE built from them assumes (they share the base's attention, norms and embeddings, and differ in
the MLPs that become experts), so a router that picks the right expert reproduces that expert
exactly on its domain.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moekit.zoo.corpora import DOMAINS, Domain
from moekit.zoo.settings import ZooSettings

# Characters of each domain's training text used to learn the tokenizer's merges.
TOKENIZER_SAMPLE_CHARS = 200_000
# Documents per tokenizer call (batched calls are much faster than one call per document).
TOKENIZE_BATCH = 64


def train_tokenizer(domains: dict[str, Domain], settings: ZooSettings):
    from moekit.testing import make_tokenizer

    corpus = []
    for domain in domains.values():
        taken = 0
        for document in domain.train:
            if taken >= TOKENIZER_SAMPLE_CHARS:
                break
            corpus.append(document)
            taken += len(document)
    return make_tokenizer(vocab_size=settings.vocab_size, corpus=corpus)


def token_blocks(documents: list[str], tokenizer, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Documents joined by EOS into one token stream, cut into blocks: (blocks, seq_len)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    limit = None if max_blocks is None else max_blocks * seq_len
    for start in range(0, len(documents), TOKENIZE_BATCH):
        for ids in tokenizer(documents[start : start + TOKENIZE_BATCH], add_special_tokens=False)["input_ids"]:
            stream += ids + [eos]
        if limit is not None and len(stream) >= limit:
            break
    usable = len(stream) // seq_len * seq_len
    if limit is not None:
        usable = min(usable, limit)
    return torch.tensor(stream[:usable], dtype=torch.long).view(-1, seq_len)


def new_base_model(settings: ZooSettings, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        max_position_embeddings=settings.seq_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(settings.seed)
    return LlamaForCausalLM(config)


def train_model(model, batches, steps: int, learning_rate: float, description: str, trainable=lambda name: True) -> list[float]:
    """AdamW with linear warm-up and cosine decay over `steps` batches; returns the loss of each step."""
    for name, param in model.named_parameters():
        param.requires_grad_(trainable(name))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )
    model.train()
    losses = []
    progress = tqdm(range(steps), desc=description, unit="step")
    for _ in progress:
        input_ids = next(batches)  # (batch, seq_len)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    for param in model.parameters():
        param.requires_grad_(True)
    return losses


def sample_batches(sources: list[tuple[torch.Tensor, int]], seed: int):
    """Endless batches of (blocks, seq_len) tensors: `count` random blocks from each (blocks, count) source, seeded."""
    rng = random.Random(seed)
    while True:
        picked = []
        for blocks, count in sources:
            picked += [blocks[rng.randrange(len(blocks))] for _ in range(count)]
        yield torch.stack(picked)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """exp(mean next-token loss) over (blocks, seq_len) token blocks."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        tokens = batch.numel() - len(batch)
        total += loss.item() * tokens
        count += tokens
    return math.exp(total / count)


def make_zoo(directory: Path, settings: ZooSettings, domains: dict[str, Domain]) -> dict:
    """Train tokenizer, base and experts into `directory`; returns the zoo's summary (also zoo.json)."""
    tokenizer = train_tokenizer(domains, settings)
    # No domain needs more blocks than its expert's training draws, so the rest is never tokenized.
    enough = settings.expert_steps * settings.batch_size
    train_blocks = {name: token_blocks(d.train, tokenizer, settings.seq_len, enough) for name, d in domains.items()}
    heldout_blocks = {name: token_blocks(d.heldout, tokenizer, settings.seq_len, settings.heldout_blocks) for name, d in domains.items()}
    validation_blocks = {name: token_blocks(d.validation, tokenizer, settings.seq_len, settings.heldout_blocks) for name, d in domains.items()}
    write_data(directory / "data", domains, {"heldout": heldout_blocks, "validation": validation_blocks}, tokenizer)

    base = new_base_model(settings, tokenizer)
    share = settings.batch_size // len(DOMAINS)
    batches = sample_batches([(train_blocks[d], share) for d in DOMAINS], settings.seed)
    base_losses = train_model(base, batches, settings.base_steps, settings.base_learning_rate, "zoo: pretraining base")
    base.save_pretrained(directory / "base")
    tokenizer.save_pretrained(directory / "base")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    summary = {"settings": settings.model_dump(), "models": {"base": {"trained_on": list(DOMAINS), "losses": base_losses[-1:]}}, "perplexity": {}}
    summary["perplexity"]["base"] = {d: perplexity(base, heldout_blocks[d]) for d in DOMAINS}

    for index, domain in enumerate(DOMAINS):
        base.load_state_dict(base_state)
        # A few blocks of the other domains in each batch (replay) keep the expert from forgetting them,
        # so a token the router sends to the wrong expert costs little.
        replayed = round(settings.batch_size * settings.expert_replay)
        others = torch.cat([train_blocks[d] for d in DOMAINS if d != domain])
        batches = sample_batches([(train_blocks[domain], settings.batch_size - replayed), (others, replayed)], settings.seed + 1 + index)
        losses = train_model(
            base, batches, settings.expert_steps, settings.expert_learning_rate, f"zoo: expert {domain}", trainable=lambda name: ".mlp." in name
        )
        base.save_pretrained(directory / domain)
        tokenizer.save_pretrained(directory / domain)
        summary["models"][domain] = {"trained_on": [domain], "losses": losses[-1:]}
        summary["perplexity"][domain] = {d: perplexity(base, heldout_blocks[d]) for d in DOMAINS}
    (directory / "zoo.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def write_data(directory: Path, domains: dict[str, Domain], blocks: dict[str, dict[str, torch.Tensor]], tokenizer) -> None:
    """`data/<domain>/heldout.jsonl` and `validation.jsonl`: those splits' blocks as text (`blocks`: split -> domain ->
    (blocks, seq_len)); `data/<domain>/train.jsonl`: training documents."""
    for name, domain in domains.items():
        folder = directory / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, split_blocks in blocks.items():
            with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"text": tokenizer.decode(block.tolist(), skip_special_tokens=True)}) + "\n" for block in split_blocks[name])
        with open(folder / "train.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": document}) + "\n" for document in domain.train)
