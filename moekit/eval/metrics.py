"""Perplexity, mean token loss and bits per byte of a causal LM on a list of texts.

Every document is scored in full (up to `max_length` tokens): its tokens are preceded by one prefix
token (the tokenizer's BOS, else its EOS, as lm-eval does) so that the first real token is predicted
too. The loss is the token-weighted mean negative log-likelihood (nats) over all scored tokens of all
documents, so long documents weigh more than short ones and padding counts for nothing; perplexity is
exp(loss). Bits per byte divide the same summed NLL by ln(2) times the UTF-8 bytes of the scored text,
which makes models with different tokenizers comparable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class SetMetrics:
    loss: float  # mean NLL per scored token (nats)
    perplexity: float
    bits_per_byte: float
    tokens: int  # scored tokens
    bytes: int  # UTF-8 bytes of the scored text
    documents: int
    truncated: int  # documents cut at max_length

    def to_dict(self) -> dict:
        values = asdict(self)
        for key in ("loss", "perplexity", "bits_per_byte"):
            values[key] = round(values[key], 6)
        return values


@dataclass
class EncodedDocument:
    input_ids: list[int]  # prefix token + text tokens
    bytes: int
    truncated: bool


def prefix_token_id(tokenizer) -> int:
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start documents with")
    return token


def encode(tokenizer, texts: Iterable[str], max_length: int) -> list[EncodedDocument]:
    """Tokenize without the tokenizer's own special tokens, then prepend exactly one prefix token."""
    prefix = prefix_token_id(tokenizer)
    encoded = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        truncated = len(ids) > max_length - 1
        if truncated:
            ids = ids[: max_length - 1]
            scored_bytes = len(tokenizer.decode(ids).encode("utf-8"))
        else:
            scored_bytes = len(text.encode("utf-8"))
        encoded.append(EncodedDocument([prefix, *ids], scored_bytes, truncated))
    return encoded


def batches(documents: list[EncodedDocument], batch_size: int, pad_id: int) -> Iterable[tuple[list[EncodedDocument], torch.Tensor, torch.Tensor]]:
    """Right-padded batches of documents of similar length (longest first, so memory errors come early)."""
    ordered = sorted(documents, key=lambda d: len(d.input_ids), reverse=True)
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        width = len(chunk[0].input_ids)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (batch, seq)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (batch, seq)
        for row, doc in enumerate(chunk):
            input_ids[row, : len(doc.input_ids)] = torch.tensor(doc.input_ids)
            attention_mask[row, : len(doc.input_ids)] = 1
        yield chunk, input_ids, attention_mask


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Summed NLL (nats) of every non-padding token after the first, in float32.

    One row at a time, so that only one document's logits exist in float32 (a batch of 8 x 1024 tokens
    over a 128k vocabulary would be 4 GB)."""
    total = 0.0
    for row in range(input_ids.shape[0]):
        length = int(attention_mask[row].sum())
        row_logits = logits[row, : length - 1].float()  # (tokens-1, vocab)
        total += F.cross_entropy(row_logits, input_ids[row, 1:length], reduction="sum").item()
    return total


def model_device(model) -> torch.device:
    return getattr(model, "device", None) or next(model.parameters()).device


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    texts: list[str],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    observer: Callable | None = None,
    forward_kwargs: dict | None = None,
    progress=None,
) -> SetMetrics:
    """Score `texts` with `model`. `observer(outputs, input_ids, attention_mask)` sees every batch's
    outputs (routing statistics use it, with `forward_kwargs={"output_router_logits": True}`);
    `progress` is a tqdm bar advanced by one per document."""
    documents = encode(tokenizer, texts, max_length)
    if not documents:
        raise ValueError("no text to score: every document tokenizes to nothing")
    device = model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix_token_id(tokenizer)
    total_nll = 0.0
    was_training = model.training
    model.eval()
    try:
        for chunk, input_ids, attention_mask in batches(documents, batch_size, pad_id):
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **(forward_kwargs or {}))
            total_nll += token_nll(outputs.logits, input_ids, attention_mask)
            if observer is not None:
                observer(outputs, input_ids, attention_mask)
            if progress is not None:
                progress.update(len(chunk))
    finally:
        model.train(was_training)
    tokens = sum(len(d.input_ids) - 1 for d in documents)
    scored_bytes = sum(d.bytes for d in documents)
    loss = total_nll / tokens
    return SetMetrics(
        loss=loss,
        perplexity=math.exp(loss),
        bits_per_byte=total_nll / (math.log(2) * scored_bytes),
        tokens=tokens,
        bytes=scored_bytes,
        documents=len(documents),
        truncated=sum(d.truncated for d in documents),
    )
