"""Training FLOPs per token of the hybrid, for MFU: matmuls only, forward x 3 (forward + backward)."""

from __future__ import annotations

from fms_bamba.model.config import BambaConfig


def num_flops_per_token(config: BambaConfig, seq_len: int) -> float:
    """FLOPs one token costs in a training step (forward + backward) at sequence length seq_len."""
    h, n_layers = config.hidden_size, config.n_layers
    d_inner, groups, state = config.mamba_d_inner, config.mamba_n_groups, config.mamba_d_state
    heads, head_dim, chunk = config.mamba_n_heads, config.mamba_head_dim, config.mamba_chunk_size
    kv_width = config.n_kv_heads * config.head_dim

    mamba = (
        2 * h * (2 * d_inner + 2 * groups * state + heads)  # in_proj
        + 2 * config.mamba_conv_dim * config.mamba_conv_kernel  # depthwise conv
        + 2 * d_inner * h  # out_proj
        # SSD: C.B scores within a chunk, scores x values, chunk states in and out
        + 2 * chunk * groups * state + 2 * chunk * heads * head_dim + 4 * heads * head_dim * state
    )
    attention = (
        2 * h * (h + 2 * kv_width)  # q, k, v projections
        + 2 * h * h  # o_proj
        + 2 * seq_len * h  # q.k and attn.v over the causal half of the sequence
    )
    mlp = 6 * h * config.mlp_hidden_size
    lm_head = 2 * h * config.vocab_size

    n_attention = len(config.attn_layer_indices)
    forward = (n_layers - n_attention) * mamba + n_attention * attention + n_layers * mlp + lm_head
    return 3.0 * forward
