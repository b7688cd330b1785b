"""Causal grouped-query attention with partial RoPE (first half of each head, NeoX rotation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fms_bamba.model.config import BambaConfig
from fms_bamba.model.kernels import flash_attn_available, flash_attn_func


def rope_cos_sin(seq_len: int, rope_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [seq_len, rope_dim] for positions 0..seq_len-1, frequencies repeated per half."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rope_dim, 2, device=device, dtype=torch.float32) / rope_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rope_dim dims of x [b, heads, s, head_dim] in two halves (NeoX style)."""
    rope_dim = cos.shape[-1]
    rotated, passed = x[..., :rope_dim].float(), x[..., rope_dim:]
    first, second = rotated.chunk(2, dim=-1)
    rotated = rotated * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([rotated.to(x.dtype), passed], dim=-1)


class Attention(nn.Module):
    """softmax(q k^T / sqrt(d)) v over the causal past (and, with doc masking, the same document)."""

    def __init__(self, config: BambaConfig):
        super().__init__()
        self.config = config
        head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * head_dim, config.hidden_size, bias=False)
        # resolved here so torch.compile never traces imports; "flash" without flash-attn fails now
        wants_flash = config.attn_impl == "flash" or (config.attn_impl == "auto" and flash_attn_available())
        self.flash = flash_attn_func() if wants_flash else None

    def use_flash(self, x: torch.Tensor, doc_ids: torch.Tensor | None) -> bool:
        # flash-attn here is causal only: doc-masked batches take SDPA
        return self.flash is not None and x.is_cuda and doc_ids is None

    def forward(self, hidden: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        batch, seq_len, _ = hidden.shape
        q = self.q_proj(hidden).view(batch, seq_len, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(batch, seq_len, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(batch, seq_len, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(seq_len, cfg.rope_dim, cfg.rope_theta, hidden.device)
        # positions count from the row start even across documents: RoPE scores depend only on
        # q-k distance, and doc masking never pairs tokens of two documents
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [b, heads, s, head_dim]
        if self.use_flash(hidden, doc_ids):
            # flash-attn path: unexercised in this repository's tests (no flash-attn build here)
            out = self.flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        else:
            mask = None
            if doc_ids is not None:
                causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=hidden.device).tril()
                mask = (causal & (doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1))).unsqueeze(1)  # [b, 1, s, s]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
            out = out.transpose(1, 2)  # [b, s, heads, head_dim]
        return self.o_proj(out.reshape(batch, seq_len, -1))
