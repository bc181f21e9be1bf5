"""Phixtral: Phi-2 with a mixture of fc1/fc2 expert MLPs behind a top-k softmax router.

Each decoder layer is Phi-2's: one LayerNorm whose output feeds both the attention and the MLP, in
parallel, added to the residual. Here the MLP is a sparse MoE of Phi-2 MLPs (transformers' own
`PhiMLP`), and the router sees exactly what a dense Phi-2 MLP would see: the input LayerNorm output.
Attention, rotary embedding, norms and embeddings are transformers' Phi modules with unchanged
parameter names, so a Phi-2 checkpoint's non-MLP tensors load as they are.

Checkpoint layout (per layer N, expert E):
    model.layers.N.mlp.gate.weight                (experts, hidden)
    model.layers.N.mlp.experts.E.fc1.weight/bias  (intermediate, hidden) / (intermediate,)
    model.layers.N.mlp.experts.E.fc2.weight/bias  (hidden, intermediate) / (hidden,)

This file is copied next to every Phixtral checkpoint moekit writes and is loaded from there with
`trust_remote_code=True`, so it imports only torch and transformers.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.models.phi.modeling_phi import PhiAttention, PhiMLP, PhiRotaryEmbedding

from .configuration_phixtral import PhixtralConfig

# transformers 5.2x renamed the KV-cache argument and output field `past_key_values` to `cache` (the old name is
# deprecated there); earlier 5.x releases know only `past_key_values`. `generate` passes the cache under the
# installed version's name, so every forward below takes either and hands it on under that name: a cache passed
# under the other name would otherwise be dropped, and each decoding step would start an empty one.
CACHE_NAME = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _cache_argument(past_key_values: Cache | None, kwargs: dict) -> Cache | None:
    """The cache given under either name (removed from `kwargs`); both at once is an error."""
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


class PhixtralSparseMoeBlock(nn.Module):
    """Top-k softmax router over Phi-2 MLP experts; top-k weights renormalised to sum to 1 (as Mixtral)."""

    def __init__(self, config: PhixtralConfig):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.jitter_noise = config.router_jitter_noise
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList([PhiMLP(config) for _ in range(self.num_experts)])

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        if self.training and self.jitter_noise > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        hidden_states = hidden_states.reshape(-1, hidden_dim)  # (tokens, hidden)
        router_logits = self.gate(hidden_states)  # (tokens, experts)
        routing_weights = F.softmax(router_logits, dim=-1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)  # (tokens, top_k)
        routing_weights = (routing_weights / routing_weights.sum(dim=-1, keepdim=True)).to(hidden_states.dtype)

        if not isinstance(self.experts, nn.ModuleList):
            # a fused replacement with the call signature of transformers' MixtralExperts (moekit's training block)
            final_hidden_states = self.experts(hidden_states, selected_experts, routing_weights)
            return final_hidden_states.reshape(batch_size, sequence_length, hidden_dim), router_logits
        final_hidden_states = torch.zeros_like(hidden_states)
        # (experts, top_k, tokens): which tokens chose each expert, and in which top-k slot
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            slot, token_idx = torch.where(expert_mask[expert_idx])
            if token_idx.numel() == 0:
                continue
            expert_output = self.experts[expert_idx](hidden_states[token_idx])  # (chosen tokens, hidden)
            expert_output = expert_output * routing_weights[token_idx, slot, None]
            final_hidden_states.index_add_(0, token_idx, expert_output.to(hidden_states.dtype))
        return final_hidden_states.reshape(batch_size, sequence_length, hidden_dim), router_logits


class PhixtralDecoderLayer(GradientCheckpointingLayer):
    """Phi-2's parallel block: residual + attention(LN(x)) + MoE(LN(x))."""

    def __init__(self, config: PhixtralConfig, layer_idx: int):
        super().__init__()
        self.self_attn = PhiAttention(config, layer_idx=layer_idx)
        self.mlp = PhixtralSparseMoeBlock(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cache = _cache_argument(past_key_values, kwargs)
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        attn_outputs, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_NAME: cache},
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        moe_outputs, router_logits = self.mlp(hidden_states)
        hidden_states = self.resid_dropout(attn_outputs) + self.resid_dropout(moe_outputs) + residual
        return hidden_states, router_logits


class PhixtralPreTrainedModel(PreTrainedModel):
    config_class = PhixtralConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PhixtralDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class PhixtralModel(PhixtralPreTrainedModel):
    def __init__(self, config: PhixtralConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.embed_dropout = nn.Dropout(config.embd_pdrop)
        self.layers = nn.ModuleList([PhixtralDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rotary_emb = PhiRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        cache = _cache_argument(past_key_values, kwargs)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        output_router_logits = output_router_logits if output_router_logits is not None else self.config.output_router_logits
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputed layers must not append to the cache twice
        # keys that callers (generate, Trainer) may pass but the layers must not receive twice
        kwargs.pop("output_attentions", None)
        kwargs.pop("return_dict", None)

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            **{CACHE_NAME: cache},
            position_ids=position_ids,
        )
        hidden_states = self.embed_dropout(inputs_embeds)
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        all_hidden_states = () if output_hidden_states else None
        all_router_logits = () if output_router_logits else None
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, router_logits = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            if output_router_logits:
                all_router_logits += (router_logits,)
        hidden_states = self.final_layernorm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        return MoeModelOutputWithPast(
            last_hidden_state=hidden_states,
            **{CACHE_NAME: cache if use_cache else None},
            hidden_states=all_hidden_states,
            router_logits=all_router_logits,
        )


class PhixtralForCausalLM(PhixtralPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PhixtralConfig):
        super().__init__(config)
        self.model = PhixtralModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_local_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        output_router_logits = output_router_logits if output_router_logits is not None else self.config.output_router_logits
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=_cache_argument(past_key_values, kwargs),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        # only the logits that are needed, e.g. the last position during generation
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        aux_loss = None
        if output_router_logits:
            aux_loss = load_balancing_loss_func(outputs.router_logits, self.num_experts, self.num_experts_per_tok, attention_mask)
            if labels is not None:
                loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)

        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            router_logits=outputs.router_logits,
        )


__all__ = ["PhixtralForCausalLM", "PhixtralModel", "PhixtralPreTrainedModel"]
