"""Tiny random-weight checkpoints and a locally trained tokenizer, for tests and benchmarks.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained on a few sentences, and
the models are transformers' own classes with random weights, saved with `save_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

import torch

TOKENIZER_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "12 + 30 = 42; 7 * 6 = 42; 100 - 58 = 42",
    '{"name": "Ada", "age": 36, "city": "London"}',
    "Solve the equation and explain each step.",
    "Write a poem about the sea and the sky.",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def make_tokenizer(vocab_size: int = 384, corpus: list[str] | None = None):
    """A byte-level BPE tokenizer trained locally, with BOS/EOS/PAD/UNK and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or TOKENIZER_CORPUS, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, **overrides):
    """A transformers config of a few layers for `arch` in llama, mistral, phi, phi3, qwen2, mixtral."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        config = transformers.LlamaConfig(**common)
    elif arch == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=None)
    elif arch == "phi3":
        config = transformers.Phi3Config(**common)
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common)
    elif arch == "phi":
        config = transformers.PhiConfig(**common, partial_rotary_factor=0.5)
    elif arch == "mixtral":
        config = transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    else:
        raise ValueError(f"unknown tiny architecture {arch}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def make_dense_checkpoint(
    path: str | Path,
    arch: str = "llama",
    seed: int = 0,
    base: str | Path | None = None,
    mlp_noise: float = 0.05,
    dtype: torch.dtype = torch.float32,
    tokenizer=None,
    **config_overrides,
) -> Path:
    """Save a tiny random model (and tokenizer) at `path`.

    With `base`, the model is a copy of that checkpoint whose MLP weights are perturbed, the way a
    fine-tune of a common base differs from it mostly in the MLPs.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    torch.manual_seed(seed)
    if base is not None:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".mlp." in name:
                    param.add_(torch.randn_like(param) * mlp_noise * param.std())
        from transformers import AutoTokenizer

        tokenizer = tokenizer or AutoTokenizer.from_pretrained(base)
    else:
        tokenizer = tokenizer or make_tokenizer()
        config = tiny_config(arch, len(tokenizer), **config_overrides)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() > 1:
                    param.normal_(0.0, 0.08)  # larger than the default init so outputs differ visibly between models
    model = model.to(dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def populate_hub_cache(cache_dir: str | Path, repo_id: str, source: str | Path, revision: str = "main") -> Path:
    """Place a local checkpoint in a Hugging Face cache as if `repo_id@revision` had been downloaded.

    With HF_HUB_CACHE=cache_dir and HF_HUB_OFFLINE=1, huggingface_hub's real `snapshot_download`
    then resolves `repo_id` to it, so Hub-id recipes run offline through the real loading code.
    """
    import hashlib
    import shutil

    repo_dir = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(source, snapshot, dirs_exist_ok=True)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    return snapshot


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """Run the real `moekit` entry point in-process under pytest's `capsys`: (exit code, all it printed)."""
    from moekit.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code or 0
    captured = capsys.readouterr()
    return code, captured.err + captured.out


# config.json of a tiny Mixtral: enough for `moekit plan` (which reads the config alone)
TINY_MOE_CONFIG = {
    "model_type": "mixtral",
    "architectures": ["MixtralForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 384,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 128,
}


def help_in_fresh_process(args: list[str]) -> tuple[str, bool]:
    """(`moekit ARGS --help`'s output, whether torch was imported) in a fresh interpreter."""
    import subprocess
    import sys

    script = (
        f"import sys\nfrom moekit.cli import main\ntry:\n    main({[*args, '--help']!r})\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return done.stdout, not done.stdout.strip().endswith("NO-TORCH")
