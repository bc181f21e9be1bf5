"""Phixtral configuration: a Phi-2 (PhiConfig) whose MLPs are a mixture of experts.

This file is copied next to every Phixtral checkpoint moekit writes and is loaded from there with
`trust_remote_code=True`, so it imports only transformers.
"""

from transformers.models.phi.configuration_phi import PhiConfig


class PhixtralConfig(PhiConfig):
    r"""
    Everything of [`PhiConfig`] (attention, partial rotary embedding, LayerNorm, GELU MLP sizes), plus the
    Mixtral-style MoE settings, under Mixtral's attribute names so that training code written for Mixtral
    (router auxiliary loss, router logits) reads them unchanged.

    num_local_experts (`int`, defaults to 4):
        Number of fc1/fc2 expert MLPs in every layer.
    num_experts_per_tok (`int`, defaults to 2):
        Experts each token is routed to (top-k).
    output_router_logits (`bool`, defaults to `False`):
        Return the router logits of every layer and add the load-balancing loss to the training loss.
    router_aux_loss_coef (`float`, defaults to 0.01):
        Weight of the load-balancing loss in the training loss.
    router_jitter_noise (`float`, defaults to 0.0):
        Multiplicative uniform noise on the router input during training.
    """

    model_type = "phixtral"
    attribute_map = {"num_experts": "num_local_experts"}  # as MixtralConfig: TRL's aux loss reads num_experts

    num_local_experts: int = 4
    num_experts_per_tok: int = 2
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.01
    router_jitter_noise: float = 0.0


__all__ = ["PhixtralConfig"]
