"""Bamba: embeddings -> blocks (pre-norm mixer + pre-norm SwiGLU MLP) -> final norm -> LM head."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fms_bamba.model import hf_mapping
from fms_bamba.model.attention import Attention, KVCache
from fms_bamba.model.config import BambaConfig
from fms_bamba.model.loss import IGNORE_INDEX, linear_cross_entropy, summed_loss_and_logit_grad
from fms_bamba.model.mamba2 import GatedRMSNorm, Mamba2Mixer, MambaState


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 whatever the activation dtype
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """x + mixer(norm(x)), then + mlp(norm(x)); the mixer is Mamba-2 or attention."""

    def __init__(self, config: BambaConfig, layer_index: int):
        super().__init__()
        self.mixer_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mixer = Attention(config) if config.is_attention_layer(layer_index) else Mamba2Mixer(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MLP(config.hidden_size, config.mlp_hidden_size)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), doc_ids)
        return x + self.mlp(self.mlp_norm(x))

    def prefill(self, x: torch.Tensor, doc_ids: torch.Tensor | None, max_len: int) -> tuple[torch.Tensor, MambaState | KVCache]:
        mixed, state = self.mixer.prefill(self.mixer_norm(x), doc_ids, max_len)
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x)), state

    def step(self, x: torch.Tensor, state: MambaState | KVCache, position: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer.step(self.mixer_norm(x), state, position)
        return x + self.mlp(self.mlp_norm(x))


@dataclass
class DecodeState:
    """Everything decoding carries between tokens: one state per block, and the next position."""

    layers: list[MambaState | KVCache]
    """Per block: conv + SSM state (Mamba-2) or a KV cache (attention), updated in place."""
    position: torch.Tensor
    """[] int64 on the model's device: position (from the row start, padding included) of the
    next token. A device tensor, so that a step captured as a CUDA graph advances it."""
    steps_left: int
    """Tokens `decode_step` may still take: the free positions of the KV caches (host side)."""

    def claim_step(self) -> None:
        """Take one free position, or raise if the caches are full."""
        if self.steps_left < 1:
            raise ValueError("decode_step: the KV caches are full; prefill with a larger max_new_tokens")
        self.steps_left -= 1


class Bamba(nn.Module):
    def __init__(self, config: BambaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.loss_and_grad = summed_loss_and_logit_grad
        if not self.output.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise as the original trainer; in-place ops only, so FSDP2 DTensor shards work."""
        cfg = self.config
        residual_scale = 1 / math.sqrt(2 * cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                # torch's default Linear init, U(+-1/sqrt(fan_in)); residual outputs shrunk so the
                # residual stream's variance does not grow with depth
                bound = 1 / math.sqrt(module.in_features)
                if name.endswith(("out_proj", "o_proj", "down_proj")):
                    bound *= residual_scale
                module.weight.uniform_(-bound, bound)
            elif isinstance(module, (RMSNorm, GatedRMSNorm)):
                module.weight.fill_(1.0)
            elif isinstance(module, Mamba2Mixer):
                # depthwise conv: torch's default Conv1d init, fan_in = kernel width
                bound = 1 / math.sqrt(cfg.mamba_conv_kernel)
                module.conv_weight.uniform_(-bound, bound)
                module.conv_bias.uniform_(-bound, bound)
                module.A_log.uniform_(cfg.a_init_min, cfg.a_init_max).log_()
                module.D.fill_(1.0)
                # dt log-uniform in [dt_min, dt_max], stored as softplus^-1(dt) = dt + log(-expm1(-dt))
                dt = module.dt_bias
                dt.uniform_(0, 1).mul_(math.log(cfg.dt_max / cfg.dt_min)).add_(math.log(cfg.dt_min)).exp_()
                dt.clamp_(min=cfg.dt_init_floor)
                dt.add_(torch.log(-torch.expm1(-dt)))
        self.tok_embeddings.weight.normal_(0.0, cfg.embedding_init_std)

    def forward(
        self,
        input_ids: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, S] -> logits [B, S, V]; with labels [B, S], the mean fp32 cross-entropy
        over labels != -100. doc_ids [B, S] is used only when config.doc_masking is on."""
        self.check_inputs(input_ids, doc_ids, labels)
        if self.config.doc_masking and doc_ids is None:
            raise ValueError("BambaConfig.doc_masking is on but forward got no doc_ids")
        doc_ids = doc_ids if self.config.doc_masking else None
        h = self.tok_embeddings(input_ids)  # [B, S, D]
        for layer in self.layers:
            h = layer(h, doc_ids)
        h = self.norm(h)
        if labels is None:
            return self.output(h)
        return self.chunked_cross_entropy(h, labels)

    @torch.no_grad()
    def prefill(
        self, input_ids: torch.Tensor, prompt_lengths: torch.Tensor | None = None, max_new_tokens: int = 0
    ) -> tuple[torch.Tensor, DecodeState]:
        """Run prompts [B, S], left-padded to S where prompt_lengths [B] is shorter; return the
        logits [B, V] at the last position and the state `decode_step` continues from, with
        room for max_new_tokens more tokens."""
        batch, seq_len = input_ids.shape
        if max_new_tokens < 0:
            raise ValueError(f"prefill: max_new_tokens must be >= 0, got {max_new_tokens}")
        self.check_inputs(input_ids, None, None, extra_positions=max_new_tokens)
        doc_ids = None
        if prompt_lengths is not None:
            if prompt_lengths.shape != (batch,) or not ((prompt_lengths >= 1) & (prompt_lengths <= seq_len)).all():
                raise ValueError(f"prompt_lengths must be [batch] in [1, {seq_len}], got {prompt_lengths.tolist()}")
            # padding is a document of its own, so the prompt starts from a fresh state
            doc_ids = (torch.arange(seq_len, device=input_ids.device) >= seq_len - prompt_lengths[:, None].to(input_ids.device)).long()
        h = self.tok_embeddings(input_ids)
        states = []
        for layer in self.layers:
            h, state = layer.prefill(h, doc_ids, seq_len + max_new_tokens)
            states.append(state)
        position = torch.tensor(seq_len, device=input_ids.device)
        return self.output(self.norm(h[:, -1])), DecodeState(states, position, steps_left=max_new_tokens)

    @torch.no_grad()
    def decode_step(self, token_ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Feed one token per row, token_ids [B]; returns logits [B, V] and advances state.
        The ids are not checked against the vocabulary (a host sync per token): feed the model's
        own samples."""
        if token_ids.dim() != 1:
            raise ValueError(f"decode_step takes one token per row, token_ids [batch], got {tuple(token_ids.shape)}")
        state.claim_step()
        return self.step_logits(token_ids, state)

    def step_logits(self, token_ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """The device work of one decoding step (what a CUDA graph records): no host sync, no
        shape that depends on the position."""
        h = self.tok_embeddings(token_ids[:, None])  # [B, 1, D]
        for layer, layer_state in zip(self.layers, state.layers):
            h = layer.step(h, layer_state, state.position)
        state.position += 1
        return self.output(self.norm(h[:, 0]))  # [B, V]

    def chunked_cross_entropy(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean fp32 CE over labels != -100 of the LM head's logits, a chunk of tokens at a time
        (model/loss.py); `loss_and_grad` is the elementwise part, which compile may replace."""
        h, labels = h.flatten(0, 1), labels.flatten()  # [B*S, D], [B*S]
        total = linear_cross_entropy(h, self.output.weight, labels, chunk_tokens=self.config.loss_chunk_tokens,
                                     loss_and_grad=self.loss_and_grad)
        return total / (labels != IGNORE_INDEX).sum().clamp(min=1)

    def check_inputs(
        self,
        input_ids: torch.Tensor,
        doc_ids: torch.Tensor | None,
        labels: torch.Tensor | None,
        extra_positions: int = 0,
    ) -> None:
        """Clear errors for malformed inputs; extra_positions counts positions before or after them."""
        cfg = self.config
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor [batch, seq], got {input_ids.dtype} {tuple(input_ids.shape)}")
        if input_ids.shape[1] + extra_positions > cfg.max_seq_len:
            raise ValueError(
                f"sequence length {input_ids.shape[1] + extra_positions} exceeds BambaConfig.max_seq_len={cfg.max_seq_len}"
            )
        for name, tensor in (("doc_ids", doc_ids), ("labels", labels)):
            if tensor is not None and tensor.shape != input_ids.shape:
                raise ValueError(f"{name} shape {tuple(tensor.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if cfg.check_token_ids and input_ids.numel():
            checks = [*torch.aminmax(input_ids)]
            if labels is not None:  # the loss takes any other label as a vocabulary row
                checks.append(((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= cfg.vocab_size))).sum())
            low, high, *bad_labels = torch.stack(checks).tolist()  # one host sync
            if low < 0 or high >= cfg.vocab_size:
                raise ValueError(
                    f"token id {high if high >= cfg.vocab_size else low} is outside the vocabulary "
                    f"[0, vocab_size={cfg.vocab_size})"
                )
            if bad_labels and bad_labels[0]:
                raise ValueError(f"{bad_labels[0]} labels are neither {IGNORE_INDEX} nor in [0, vocab_size={cfg.vocab_size})")

    @classmethod
    def from_hf(cls, path: str | Path, *, dtype: torch.dtype | None = None, **config_overrides) -> Bamba:
        """Load a transformers Bamba folder (config.json + safetensors, single or sharded).
        dtype=None keeps the stored dtype."""
        config = hf_mapping.read_hf_config(path, **config_overrides)
        state = hf_mapping.from_hf_state_dict(hf_mapping.load_safetensors_folder(path), config)
        if dtype is not None:
            state = {name: tensor.to(dtype) for name, tensor in state.items()}
        return cls.from_state_dict(config, state)

    @classmethod
    def from_state_dict(cls, config: BambaConfig, state: dict[str, torch.Tensor]) -> Bamba:
        """A model whose parameters are `state`'s tensors themselves: no copy, no initialisation."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, assign=True)
        return model


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices (linear, conv and embedding weights) decay; vectors (A_log, D,
    dt_bias, norm weights, biases) do not. Works on FSDP2 models (DTensors keep global shapes)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
