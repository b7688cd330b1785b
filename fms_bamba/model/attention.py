"""Causal grouped-query attention with partial RoPE (first half of each head, NeoX rotation)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fms_bamba.model.config import BambaConfig
from fms_bamba.model.kernels import flash_attn_available, flash_attn_func


def rope_cos_sin(positions: torch.Tensor, rope_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [len(positions), rope_dim], frequencies repeated per half."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rope_dim, 2, device=positions.device, dtype=torch.float32) / rope_dim)
    angles = torch.outer(positions.float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rope_dim dims of x [b, heads, s, head_dim] in two halves (NeoX style)."""
    rope_dim = cos.shape[-1]
    rotated, passed = x[..., :rope_dim].float(), x[..., rope_dim:]
    first, second = rotated.chunk(2, dim=-1)
    rotated = rotated * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([rotated.to(x.dtype), passed], dim=-1)


@dataclass
class KVCache:
    """Keys and values of the positions decoded so far, for one attention layer."""

    k: torch.Tensor
    """[b, kv_heads, max_len, head_dim], RoPE applied."""
    v: torch.Tensor
    """[b, kv_heads, max_len, head_dim]."""
    visible: torch.Tensor
    """[b, max_len] bool: positions later tokens attend to (not padding, not another document)."""


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

    def project(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [b, heads, s, head_dim] of hidden [b, s, D] at positions [s], RoPE applied."""
        cfg = self.config
        batch, seq_len, _ = hidden.shape
        q = self.q_proj(hidden).view(batch, seq_len, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(batch, seq_len, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(batch, seq_len, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        # positions count from the row start even across documents: RoPE scores depend only on
        # q-k distance, and doc masking never pairs tokens of two documents
        cos, sin = rope_cos_sin(positions, cfg.rope_dim, cfg.rope_theta)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
        """Causal (and same-document) attention of q, k, v [b, heads, s, head_dim] -> [b, s, D]."""
        batch, _, seq_len, _ = q.shape
        if self.use_flash(q, doc_ids):
            # flash-attn path: unexercised in this repository's tests (no flash-attn build here)
            out = self.flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        else:
            mask = None
            if doc_ids is not None:
                causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
                mask = (causal & (doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1))).unsqueeze(1)  # [b, 1, s, s]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
            out = out.transpose(1, 2)  # [b, s, heads, head_dim]
        return self.o_proj(out.reshape(batch, seq_len, -1))

    def forward(self, hidden: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(*self.project(hidden, torch.arange(hidden.shape[1], device=hidden.device)), doc_ids)

    def prefill(self, hidden: torch.Tensor, doc_ids: torch.Tensor | None, max_len: int) -> tuple[torch.Tensor, KVCache]:
        """forward, also returning a cache of max_len positions holding this sequence's keys."""
        q, k, v = self.project(hidden, torch.arange(hidden.shape[1], device=hidden.device))
        batch, kv_heads, seq_len, head_dim = k.shape
        cache = KVCache(
            k=k.new_zeros(batch, kv_heads, max_len, head_dim),
            v=v.new_zeros(batch, kv_heads, max_len, head_dim),
            visible=torch.zeros(batch, max_len, dtype=torch.bool, device=k.device),
        )
        cache.k[:, :, :seq_len], cache.v[:, :, :seq_len] = k, v
        cache.visible[:, :seq_len] = True if doc_ids is None else doc_ids == doc_ids[:, -1:]
        return self.attend(q, k, v, doc_ids), cache

    def step(self, hidden: torch.Tensor, cache: KVCache, position: torch.Tensor) -> torch.Tensor:
        """One token per row at `position` ([] int64, on the device): hidden [b, 1, D] -> [b, 1, D],
        filling the cache. Shapes never depend on the position, so a CUDA graph can replay it."""
        cfg = self.config
        batch = hidden.shape[0]
        at = position.view(1)
        q, k, v = self.project(hidden, at)
        cache.k.index_copy_(2, at, k)
        cache.v.index_copy_(2, at, v)
        cache.visible.index_fill_(1, at, True)
        # one query per row: each KV head serves its group of query heads straight from the cache
        # (no copy of the cache per query head), over every position, unwritten ones masked out
        q = q.view(batch, cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim)  # [b, kv, g, d]
        scores = (q @ cache.k.transpose(2, 3)).float() * cfg.head_dim**-0.5  # [b, kv, g, max_len]
        scores = scores.masked_fill(~cache.visible[:, None, None, :], float("-inf"))
        out = scores.softmax(-1).to(cache.v.dtype) @ cache.v  # [b, kv, g, d]
        return self.o_proj(out.reshape(batch, 1, -1))
