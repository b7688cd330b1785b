"""The Mamba-2 mixer: in_proj -> causal conv -> SSD scan -> gated RMSNorm -> out_proj."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fms_bamba.model.config import BambaConfig
from fms_bamba.model.kernels import kernels_available, mamba_split_conv1d_scan
from fms_bamba.model.ssd import causal_conv1d, causal_conv1d_step, ssd_chunked_scan, ssd_step


@dataclass
class MambaState:
    """What a Mamba-2 mixer carries from one decoding step to the next."""

    conv: torch.Tensor
    """[b, K-1, conv_dim] the last K-1 inputs of the causal conv."""
    ssm: torch.Tensor
    """[b, heads, head_dim, d_state] the SSM state, fp32."""


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) over each group of channels: the gate goes before the norm."""

    def __init__(self, dim: int, n_groups: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.n_groups = n_groups
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # y [b, s, d_inner] (fp32 from the scan), z [b, s, d_inner] -> z's dtype
        gated = (y.float() * F.silu(z.float())).unflatten(-1, (self.n_groups, -1))
        normed = F.rms_norm(gated, (gated.shape[-1],), eps=self.eps).flatten(-2)
        return self.weight * normed.to(z.dtype)


class Mamba2Mixer(nn.Module):
    """Mamba-2 (SSD) sequence mixer with a pure-PyTorch path and mamba-ssm's fused kernel path."""

    def __init__(self, config: BambaConfig):
        super().__init__()
        self.config = config
        d_inner, n_heads = config.mamba_d_inner, config.mamba_n_heads
        self.bc_dim = config.mamba_n_groups * config.mamba_d_state
        # one projection for [z (gate), xBC (conv input), dt]
        self.in_proj = nn.Linear(config.hidden_size, d_inner + config.mamba_conv_dim + n_heads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(config.mamba_conv_dim, config.mamba_conv_kernel))
        self.conv_bias = nn.Parameter(torch.empty(config.mamba_conv_dim))
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.D = nn.Parameter(torch.empty(n_heads))
        self.norm = GatedRMSNorm(d_inner, config.mamba_n_groups, config.norm_eps)
        self.out_proj = nn.Linear(d_inner, config.hidden_size, bias=False)
        # resolved here rather than in forward, so torch.compile never traces the import machinery;
        # "kernels" without the packages fails now, naming the missing one
        wants_kernels = config.mixer_impl == "kernels" or (config.mixer_impl == "auto" and kernels_available())
        self.fused_scan = mamba_split_conv1d_scan() if wants_kernels else None

    def use_kernels(self, x: torch.Tensor) -> bool:
        if self.fused_scan is not None and not x.is_cuda and self.config.mixer_impl == "kernels":
            raise RuntimeError(f"mixer_impl='kernels' runs on CUDA tensors only, got {x.device}")
        return self.fused_scan is not None and x.is_cuda

    @torch.compiler.disable  # a Triton autograd.Function: run as is, outside compiled graphs
    def fused_forward(self, zxbcdt: torch.Tensor, A: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
        """conv + SSD scan + gated norm + out_proj in mamba-ssm's kernels; doc_ids as seq_idx."""
        cfg = self.config
        return self.fused_scan(
            zxbcdt, self.conv_weight, self.conv_bias, self.dt_bias, A, self.D,
            chunk_size=cfg.mamba_chunk_size,
            seq_idx=None if doc_ids is None else doc_ids.to(torch.int32),
            activation="silu", rmsnorm_weight=self.norm.weight, rmsnorm_eps=cfg.norm_eps,
            outproj_weight=self.out_proj.weight, headdim=cfg.mamba_head_dim,
            ngroups=cfg.mamba_n_groups, norm_before_gate=False,
        )

    def forward(self, hidden: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        zxbcdt = self.in_proj(hidden)  # [b, s, d_inner + conv_dim + n_heads]
        A = -torch.exp(self.A_log.float())  # [n_heads], negative: the state decays
        if self.use_kernels(hidden):
            return self.fused_forward(zxbcdt, A, doc_ids)
        return self.reference_forward(zxbcdt, A, doc_ids)

    def reference_forward(
        self, zxbcdt: torch.Tensor, A: torch.Tensor, doc_ids: torch.Tensor | None, return_state: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, MambaState]:
        cfg = self.config
        z, xBC, dt = zxbcdt.split([cfg.mamba_d_inner, cfg.mamba_conv_dim, cfg.mamba_n_heads], dim=-1)
        conv_out = F.silu(causal_conv1d(xBC, self.conv_weight, self.conv_bias, doc_ids))
        x, B, C = conv_out.split([cfg.mamba_d_inner, self.bc_dim, self.bc_dim], dim=-1)
        x = x.unflatten(-1, (cfg.mamba_n_heads, cfg.mamba_head_dim))  # [b, s, h, p]
        B = B.unflatten(-1, (cfg.mamba_n_groups, cfg.mamba_d_state))  # [b, s, g, n]
        C = C.unflatten(-1, (cfg.mamba_n_groups, cfg.mamba_d_state))  # [b, s, g, n]
        dt = F.softplus(dt.float() + self.dt_bias.float())  # [b, s, h], positive step sizes
        y, ssm_state = ssd_chunked_scan(x, dt, A, B, C, cfg.mamba_chunk_size, doc_ids, return_final_state=True)
        y = y + x * self.D[:, None]  # skip connection; y [b, s, h, p] fp32
        out = self.out_proj(self.norm(y.flatten(-2), z))
        if not return_state:
            return out
        return out, MambaState(conv=self.last_conv_inputs(xBC, doc_ids), ssm=ssm_state)

    def last_conv_inputs(self, xBC: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
        """The conv window after the last position: the last K-1 inputs of its document, else 0."""
        width = self.config.mamba_conv_kernel - 1
        missing = max(0, width - xBC.shape[1])
        window = F.pad(xBC[:, -width:], (0, 0, missing, 0))  # [b, K-1, conv_dim]
        if doc_ids is not None:
            docs = F.pad(doc_ids[:, -width:], (missing, 0), value=-1)
            window = window * (docs == doc_ids[:, -1:]).unsqueeze(-1)
        return window

    def prefill(self, hidden: torch.Tensor, doc_ids: torch.Tensor | None, max_len: int) -> tuple[torch.Tensor, MambaState]:
        """forward, also returning the state that `step` continues from (max_len: unused here)."""
        return self.reference_forward(self.in_proj(hidden), -torch.exp(self.A_log.float()), doc_ids, return_state=True)

    def step(self, hidden: torch.Tensor, state: MambaState, position: int) -> torch.Tensor:
        """One token per row: hidden [b, 1, D] -> [b, 1, D], updating state in place."""
        cfg = self.config
        z, xBC, dt = self.in_proj(hidden[:, 0]).split([cfg.mamba_d_inner, cfg.mamba_conv_dim, cfg.mamba_n_heads], dim=-1)
        conv_out = F.silu(causal_conv1d_step(state.conv, xBC, self.conv_weight, self.conv_bias))
        x, B, C = conv_out.split([cfg.mamba_d_inner, self.bc_dim, self.bc_dim], dim=-1)
        x = x.unflatten(-1, (cfg.mamba_n_heads, cfg.mamba_head_dim))  # [b, h, p]
        dt = F.softplus(dt.float() + self.dt_bias.float())  # [b, h]
        A = -torch.exp(self.A_log.float())
        y = ssd_step(state.ssm, x, dt, A, B.unflatten(-1, (cfg.mamba_n_groups, -1)), C.unflatten(-1, (cfg.mamba_n_groups, -1)))
        y = y + x * self.D[:, None]
        return self.out_proj(self.norm(y.flatten(-2), z)).unsqueeze(1)
