"""The Mamba-2 mixer: in_proj -> causal conv -> SSD scan -> gated RMSNorm -> out_proj."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fms_bamba.model.config import BambaConfig
from fms_bamba.model.fused_mixer_op import split_conv1d_scan_fwd
from fms_bamba.model.kernels import kernels_available, mamba_step_kernels
from fms_bamba.model.ssd import (
    causal_conv1d_step, gated_rms_norm, split_conv1d_scan, split_conv_output, ssd_step, ssm_inputs,
)

# mamba-ssm's Triton kernels compute offsets in int32, so one call may span no more elements of
# zxbcdt than this (bamba-9b at 4096 tokens: 31 sequences); larger batches go in slices.
KERNEL_MAX_ELEMENTS = 2**31 - 1


@dataclass
class MambaState:
    """What a Mamba-2 mixer carries from one decoding step to the next."""

    conv: torch.Tensor
    """[b, conv_dim, K-1] the last K-1 inputs of the causal conv (causal-conv1d's layout)."""
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
        return gated_rms_norm(y, z, self.weight, self.n_groups, self.eps)[0]


class Mamba2Mixer(nn.Module):
    """Mamba-2 (SSD) sequence mixer with a pure-PyTorch path and mamba-ssm's fused kernel path."""

    def __init__(self, config: BambaConfig):
        super().__init__()
        self.config = config
        d_inner, n_heads = config.mamba_d_inner, config.mamba_n_heads
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
        self.kernels = config.mixer_impl == "kernels" or (config.mixer_impl == "auto" and kernels_available())
        self.step_kernels = mamba_step_kernels() if self.kernels else None

    def use_kernels(self, x: torch.Tensor) -> bool:
        if self.kernels and not x.is_cuda and self.config.mixer_impl == "kernels":
            raise RuntimeError(f"mixer_impl='kernels' runs on CUDA tensors only, got {x.device}")
        return self.kernels and x.is_cuda

    def scan_inputs(self) -> tuple[tuple[torch.Tensor, ...], tuple[int, int, float]]:
        """The arguments of `split_conv1d_scan` (and of the fused op) around doc_ids: the weights,
        then chunk size, groups and norm eps."""
        cfg = self.config
        weights = self.conv_weight, self.conv_bias, self.dt_bias, self.A(), self.D, self.norm.weight, self.out_proj.weight
        return weights, (cfg.mamba_chunk_size, cfg.mamba_n_groups, cfg.norm_eps)

    def fused_forward(self, zxbcdt: torch.Tensor, doc_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """conv + SSD scan + gated norm + out_proj as one custom op (mamba-ssm's kernels on CUDA),
        doc_ids as seq_idx -> out [b, s, hidden] and the SSM state after the last position
        [b, h, p, n] (fp32)."""
        rows = max(1, KERNEL_MAX_ELEMENTS // zxbcdt[0].numel())
        if zxbcdt.shape[0] > rows:
            parts = [
                self.fused_forward(zxbcdt[i : i + rows], None if doc_ids is None else doc_ids[i : i + rows])
                for i in range(0, zxbcdt.shape[0], rows)
            ]
            return tuple(map(torch.cat, zip(*parts)))
        weights, settings = self.scan_inputs()
        seq_idx = None if doc_ids is None else doc_ids.to(torch.int32)
        out, _, _, ssm_state = split_conv1d_scan_fwd(zxbcdt, *weights, seq_idx, *settings)
        return out, ssm_state

    def reference_forward(
        self, zxbcdt: torch.Tensor, doc_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`fused_forward` in plain PyTorch, autograd through it (the state in fp64 for fp64)."""
        weights, settings = self.scan_inputs()
        out, _, _, ssm_state = split_conv1d_scan(zxbcdt, *weights, doc_ids, *settings)
        return out, ssm_state

    def forward(self, hidden: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        zxbcdt = self.in_proj(hidden)  # [b, s, d_inner + conv_dim + n_heads]
        scan = self.fused_forward if self.use_kernels(hidden) else self.reference_forward
        return scan(zxbcdt, doc_ids)[0]

    def A(self) -> torch.Tensor:
        """[n_heads] fp32, negative: how fast each head's state decays."""
        return -torch.exp(self.A_log.float())

    def split_projection(self, zxbcdt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[..., d_inner + conv_dim + n_heads] -> z (gate), xBC (conv input), dt (raw step)."""
        cfg = self.config
        return zxbcdt.split([cfg.mamba_d_inner, cfg.mamba_conv_dim, cfg.mamba_n_heads], dim=-1)

    def split_conv_output(self, conv_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """conv output [..., conv_dim] -> x [..., h, p], B and C [..., g, n]."""
        cfg = self.config
        return split_conv_output(conv_out, cfg.mamba_n_heads, cfg.mamba_head_dim, cfg.mamba_n_groups)

    def ssm_inputs(self, conv_out: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """conv output [..., conv_dim] and raw dt [..., h] -> x [..., h, p], B and C [..., g, n],
        dt [..., h] (positive, fp32)."""
        cfg = self.config
        return ssm_inputs(conv_out, dt, self.dt_bias, cfg.mamba_n_heads, cfg.mamba_head_dim, cfg.mamba_n_groups)

    def output(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Scan output y and input x [..., h, p] (skip connection D), gate z -> [..., hidden]."""
        return self.gate_and_project(y + x * self.D[:, None], z)

    def gate_and_project(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y [..., h, p] (skip connection included), gate z [..., d_inner] -> [..., hidden]."""
        return self.out_proj(self.norm(y.flatten(-2), z))

    def last_conv_inputs(self, xBC: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
        """The conv window after the last position, [b, conv_dim, K-1]: the last K-1 inputs of
        its document, else 0."""
        width = self.config.mamba_conv_kernel - 1
        missing = max(0, width - xBC.shape[1])
        window = F.pad(xBC[:, -width:], (0, 0, missing, 0))  # [b, K-1, conv_dim]
        if doc_ids is not None:
            docs = F.pad(doc_ids[:, -width:], (missing, 0), value=-1)
            window = window * (docs == doc_ids[:, -1:]).unsqueeze(-1)
        return window.transpose(1, 2).contiguous()

    def prefill(self, hidden: torch.Tensor, doc_ids: torch.Tensor | None, max_len: int) -> tuple[torch.Tensor, MambaState]:
        """forward, also returning the state `step` continues from. max_len is the attention
        layers' cache length; the state here has a fixed size."""
        zxbcdt = self.in_proj(hidden)
        scan = self.fused_forward if self.use_kernels(hidden) else self.reference_forward
        out, ssm_state = scan(zxbcdt, doc_ids)
        conv_state = self.last_conv_inputs(self.split_projection(zxbcdt)[1], doc_ids)
        return out, MambaState(conv=conv_state, ssm=ssm_state)

    def step(self, hidden: torch.Tensor, state: MambaState, position: torch.Tensor) -> torch.Tensor:
        """One token per row: hidden [b, 1, D] -> [b, 1, D], updating state in place (the
        position does not matter to a recurrence)."""
        z, xBC, dt = self.split_projection(self.in_proj(hidden[:, 0]))
        if self.step_kernels is not None and hidden.is_cuda:
            return self.kernel_step(z, xBC, dt, state).unsqueeze(1)
        x, B, C, dt = self.ssm_inputs(F.silu(causal_conv1d_step(state.conv, xBC, self.conv_weight, self.conv_bias)), dt)
        y = ssd_step(state.ssm, x, dt, self.A(), B, C)  # [b, h, p] fp32
        return self.output(y, x, z).unsqueeze(1)

    def kernel_step(self, z: torch.Tensor, xBC: torch.Tensor, dt: torch.Tensor, state: MambaState) -> torch.Tensor:
        """`step` in causal-conv1d's and mamba-ssm's single-step kernels: z [b, d_inner], xBC
        [b, conv_dim], raw dt [b, h] -> [b, hidden]."""
        conv_update, state_update = self.step_kernels
        cfg = self.config
        head_dim, d_state = cfg.mamba_head_dim, cfg.mamba_d_state
        x, B, C = self.split_conv_output(
            conv_update(xBC.contiguous(), state.conv, self.conv_weight, self.conv_bias, activation="silu")
        )
        # the kernel takes per-channel dt, A, D; stride-0 views tell it they are per head
        y = state_update(
            state.ssm, x, dt.unsqueeze(-1).expand(-1, -1, head_dim),
            self.A()[:, None, None].expand(-1, head_dim, d_state), B, C,
            D=self.D[:, None].expand(-1, head_dim), dt_bias=self.dt_bias[:, None].expand(-1, head_dim),
            dt_softplus=True,
        )  # [b, h, p], D * x included
        return self.gate_and_project(y, z)
