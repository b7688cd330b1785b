"""A decoding step replayed as a CUDA graph: one launch per token instead of a few hundred."""

from __future__ import annotations

import torch

from fms_bamba.model.bamba import Bamba, DecodeState


class CudaGraphDecoder:
    """`Bamba.decode_step` for one DecodeState, recorded once as a CUDA graph.

    The graph reads a fixed token buffer and the state's position tensor, updates the state's
    conv/SSM states and KV caches in place and writes a fixed logits buffer; Python only copies
    the tokens in and replays it, so a step costs no host sync. The first call runs eagerly (it
    compiles the Triton kernels and warms cuBLAS on a side stream, as capture needs), then records
    the graph; later calls replay it. The returned logits are that buffer: read them before the
    next call.
    """

    def __init__(self, model: Bamba, state: DecodeState, batch_size: int):
        if not state.position.is_cuda:
            raise ValueError(f"CudaGraphDecoder needs a state on a CUDA device, got {state.position.device}")
        self.model = model
        self.state = state
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=state.position.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [B] -> logits [B, V], advancing the state as `Bamba.decode_step` does."""
        if token_ids.shape != self.tokens.shape:
            raise ValueError(f"token_ids must be {tuple(self.tokens.shape)}, got {tuple(token_ids.shape)}")
        self.state.claim_step()
        self.tokens.copy_(token_ids)
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self.model.step_logits(self.tokens, self.state)
        torch.cuda.current_stream().wait_stream(side)
        logits.record_stream(torch.cuda.current_stream())
        # recording runs nothing, so the state is where the eager step left it
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.model.step_logits(self.tokens, self.state)
        return logits
