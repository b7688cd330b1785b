"""Pure-PyTorch Mamba-2 pieces: the depthwise causal conv, the chunked SSD scan, the gated norm,
and the mixer after in_proj built from them (the reference path, and the fused op's CPU kernel).

The conv and the scan optionally restart at packed-document boundaries: given doc_ids [B, S], a
token only sees tokens of its own document. Documents are contiguous, so "t and u are in one
document" is just doc_ids[t] == doc_ids[u], and the scan applies that as a 0/1 factor on every
decay term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, doc_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Depthwise causal conv: out[t] = bias + sum_k weight[:, k] * x[t - (K-1) + k].

    x [B, S, C], weight [C, K], bias [C], doc_ids [B, S] -> [B, S, C].
    """
    seq_len, kernel = x.shape[1], weight.shape[1]
    out = x * weight[:, kernel - 1]
    for shift in range(1, kernel):
        past = F.pad(x, (0, 0, shift, 0))[:, :seq_len]  # x[t - shift], zeros before the start
        if doc_ids is not None:
            same_doc = doc_ids == F.pad(doc_ids, (shift, 0), value=-1)[:, :seq_len]
            past = past * same_doc.unsqueeze(-1)
        out = out + past * weight[:, kernel - 1 - shift]
    return out if bias is None else out + bias


def ssd_chunked_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    doc_ids: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan (Mamba-2 paper, Sec. 6) by chunks, accumulating in at least fp32.

    Per head:  h[t] = exp(dt[t] * A) h[t-1] + dt[t] B[t] x[t]^T,   y[t] = h[t] C[t]
    x [b, s, h, p], dt [b, s, h] (after softplus), A [h] (negative), B and C [b, s, g, n],
    doc_ids [b, s] -> y [b, s, h, p] in fp32 (fp64 for fp64 inputs), and with
    return_final_state the state h[s-1] [b, h, p, n] that decoding continues from. Any s: the
    tail chunk is zero-padded.
    """
    batch, seq_len, n_heads, head_dim = x.shape
    heads_per_group = n_heads // B.shape[2]
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    pad = -seq_len % chunk_size
    n_chunks = (seq_len + pad) // chunk_size

    def to_chunks(t: torch.Tensor) -> torch.Tensor:
        # padded steps have dt = 0 and x = 0: they neither decay nor add to the state
        t = F.pad(t.to(compute_dtype), (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(batch, n_chunks, chunk_size, *t.shape[2:])

    x = to_chunks(x)  # [b, c, l, h, p]
    dt = to_chunks(dt)  # [b, c, l, h]
    B = to_chunks(B).repeat_interleave(heads_per_group, dim=3)  # [b, c, l, h, n]
    C = to_chunks(C).repeat_interleave(heads_per_group, dim=3)  # [b, c, l, h, n]
    x_dt = x * dt.unsqueeze(-1)  # the input term dt[t] x[t]

    # log decay from the chunk start through step l (inclusive): sum of dt * A
    log_decay = torch.cumsum(dt * A.to(compute_dtype), dim=2)  # [b, c, l, h]

    if doc_ids is not None:
        # padded steps join the last document, so they never cut a chunk's state
        docs = torch.cat([doc_ids, doc_ids[:, -1:].expand(-1, pad)], dim=1)
        docs = docs.reshape(batch, n_chunks, chunk_size)  # [b, c, l]
        chunk_end_doc = docs[:, :, -1]  # [b, c]

    # 1. within a chunk (the quadratic, attention-like form): decay[i, j] = exp(sum_{j<k<=i} dt A)
    decay = log_decay.unsqueeze(3) - log_decay.unsqueeze(2)  # [b, c, i, j, h]
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(decay.masked_fill(~causal[:, :, None], float("-inf")))
    if doc_ids is not None:
        decay = decay * (docs.unsqueeze(3) == docs.unsqueeze(2)).unsqueeze(-1)
    scores = torch.einsum("bcihn,bcjhn->bcijh", C, B) * decay
    y = torch.einsum("bcijh,bcjhp->bcihp", scores, x_dt)

    # 2. each chunk's own contribution to the state at its end
    decay_to_end = torch.exp(log_decay[:, :, -1:] - log_decay)  # [b, c, l, h]
    if doc_ids is not None:
        decay_to_end = decay_to_end * (docs == chunk_end_doc.unsqueeze(-1)).unsqueeze(-1)
    chunk_states = torch.einsum("bclh,bclhn,bclhp->bchpn", decay_to_end, B, x_dt)

    # 3. carry the state across chunks (a short sequential recurrence over n_chunks)
    chunk_decay = torch.exp(log_decay[:, :, -1])  # [b, c, h]
    state = torch.zeros_like(chunk_states[:, 0])  # [b, h, p, n]
    start_states = []
    for c in range(n_chunks):
        start_states.append(state)
        carry = chunk_decay[:, c]
        if doc_ids is not None and c > 0:
            carry = carry * (chunk_end_doc[:, c] == chunk_end_doc[:, c - 1]).unsqueeze(-1)
        state = state * carry[:, :, None, None] + chunk_states[:, c]
    start_states = torch.stack(start_states, dim=1)  # [b, c, h, p, n]

    # 4. the state entering each chunk, decayed to step l and read out through C
    decay_from_start = torch.exp(log_decay)  # [b, c, l, h]
    if doc_ids is not None:
        previous_end_doc = F.pad(chunk_end_doc, (1, 0), value=-1)[:, :-1]  # [b, c]
        decay_from_start = decay_from_start * (docs == previous_end_doc.unsqueeze(-1)).unsqueeze(-1)
    y = y + torch.einsum("bclhn,bchpn,bclh->bclhp", C, start_states, decay_from_start)

    y = y.reshape(batch, n_chunks * chunk_size, n_heads, head_dim)[:, :seq_len]
    return (y, state) if return_final_state else y


def split_conv_output(conv_out: torch.Tensor, n_heads: int, head_dim: int, n_groups: int) -> tuple[torch.Tensor, ...]:
    """conv output [..., h*p + 2*g*n] -> x [..., h, p], B and C [..., g, n]."""
    d_inner = n_heads * head_dim
    bc_dim = (conv_out.shape[-1] - d_inner) // 2
    x, B, C = conv_out.split([d_inner, bc_dim, bc_dim], dim=-1)
    return x.unflatten(-1, (n_heads, head_dim)), B.unflatten(-1, (n_groups, -1)), C.unflatten(-1, (n_groups, -1))


def ssm_inputs(
    conv_out: torch.Tensor, dt: torch.Tensor, dt_bias: torch.Tensor, n_heads: int, head_dim: int, n_groups: int
) -> tuple[torch.Tensor, ...]:
    """conv output [..., conv_dim] (after SiLU) and raw dt [..., h] -> x [..., h, p], B and C
    [..., g, n], dt [..., h] (positive, fp32)."""
    return *split_conv_output(conv_out, n_heads, head_dim, n_groups), F.softplus(dt.float() + dt_bias.float())


def gated_rms_norm(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, n_groups: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight * RMSNorm(y * silu(z)) over each of n_groups groups of channels (the gate goes before
    the norm). y [..., d] (fp32 from the scan), z [..., d] -> out [..., d] in z's dtype, and rstd
    [..., g], the fp32 1/rms of each group."""
    gated = (y.float() * F.silu(z.float())).unflatten(-1, (n_groups, -1))  # [..., g, d/g]
    rstd = torch.rsqrt(gated.square().mean(-1) + eps)
    return weight * (gated * rstd.unsqueeze(-1)).flatten(-2).to(z.dtype), rstd


def split_conv1d_scan(
    zxbcdt: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    norm_weight: torch.Tensor,
    out_proj_weight: torch.Tensor,
    doc_ids: torch.Tensor | None,
    chunk_size: int,
    n_groups: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Mamba-2 mixer after in_proj, as mamba-ssm's `mamba_split_conv1d_scan_combined` fuses it:
    causal conv + SiLU, SSD scan, y += D x, gated RMSNorm, out_proj.

    zxbcdt [b, s, d_inner + conv_dim + h] split as [z, xBC, dt]; A [h] (negative), D [h] ->
    out [b, s, hidden]; also y [b, s, h, p] (the scan with D x, fp32), the norm's rstd [b, s, g]
    and the SSM state after the last position [b, h, p, n].
    """
    n_heads, d_inner = A.shape[0], norm_weight.shape[0]
    z, xBC, dt = zxbcdt.split([d_inner, conv_weight.shape[0], n_heads], dim=-1)
    conv_out = F.silu(causal_conv1d(xBC, conv_weight, conv_bias, doc_ids))
    x, B, C, dt = ssm_inputs(conv_out, dt, dt_bias, n_heads, d_inner // n_heads, n_groups)
    y, state = ssd_chunked_scan(x, dt, A, B, C, chunk_size, doc_ids, return_final_state=True)
    y = y + x * D[:, None]
    normed, rstd = gated_rms_norm(y.flatten(-2), z, norm_weight, n_groups, eps)
    return F.linear(normed, out_proj_weight), y, rstd, state


def causal_conv1d_step(
    window: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """One step of causal_conv1d. window [b, C, K-1] holds the previous K-1 inputs and is
    shifted in place to end with x [b, C]; returns out [b, C]."""
    taps = torch.cat([window, x.unsqueeze(-1)], dim=-1)  # [b, C, K]
    window.copy_(taps[..., 1:])
    out = torch.einsum("bck,ck->bc", taps, weight)
    return out if bias is None else out + bias


def ssd_step(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> torch.Tensor:
    """One step of the recurrence: h = exp(dt A) h + dt B x^T (state [b, h, p, n], updated in
    place), then y = h C. x [b, h, p], dt [b, h], B and C [b, g, n] -> y [b, h, p] in fp32."""
    heads_per_group = x.shape[1] // B.shape[1]
    B = B.to(state.dtype).repeat_interleave(heads_per_group, dim=1)  # [b, h, n]
    C = C.to(state.dtype).repeat_interleave(heads_per_group, dim=1)  # [b, h, n]
    x_dt = x.to(state.dtype) * dt.to(state.dtype).unsqueeze(-1)  # [b, h, p]
    state.mul_(torch.exp(dt * A).to(state.dtype)[:, :, None, None])
    state.add_(x_dt.unsqueeze(-1) * B.unsqueeze(2))
    return torch.einsum("bhpn,bhn->bhp", state, C)
