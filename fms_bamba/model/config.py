"""BambaConfig: the model's shape, its compute paths, its initialisation; presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MIXER_IMPLS = ("auto", "reference", "kernels")
ATTN_IMPLS = ("auto", "sdpa", "flash")


@dataclass
class BambaConfig:
    """A hybrid Mamba-2 / attention decoder. Defaults are Bamba-9B (the `bamba-9b` preset)."""

    vocab_size: int = 128256
    """Tokens in the vocabulary (rows of the untied input and output embeddings)."""
    hidden_size: int = 4096
    """Width of the residual stream."""
    n_layers: int = 32
    """Decoder blocks; each is a mixer (Mamba-2 or attention) followed by a SwiGLU MLP."""
    attn_layer_indices: tuple[int, ...] = (9, 18, 27)
    """Which blocks use attention as their mixer; every other block uses Mamba-2."""
    mlp_hidden_size: int = 14336
    """Inner width of the SwiGLU MLP."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm (pre-norms, final norm, the mixer's gated norm)."""
    n_heads: int = 32
    """Attention query heads; the attention head dim is hidden_size // n_heads."""
    n_kv_heads: int = 8
    """Attention key/value heads (grouped-query attention)."""
    rope_theta: float = 10000.0
    """RoPE base; rotary embedding covers the first half of each attention head's dims."""
    mamba_expand: int = 2
    """Mamba-2 inner width (d_inner) as a multiple of hidden_size."""
    mamba_n_heads: int = 128
    """Mamba-2 SSM heads; mamba_n_heads * mamba_head_dim must equal d_inner."""
    mamba_head_dim: int = 64
    """Channels per Mamba-2 SSM head."""
    mamba_d_state: int = 128
    """SSM state size N per group."""
    mamba_n_groups: int = 1
    """Groups sharing B and C (like KV groups in GQA)."""
    mamba_conv_kernel: int = 4
    """Width of the depthwise causal convolution on x, B and C."""
    mamba_chunk_size: int = 256
    """Chunk length Q of the SSD scan."""
    max_seq_len: int = 4096
    """Longest sequence the model accepts."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token id, written into exported configs (Llama-3: 128000)."""
    eos_token_id: int | None = None
    """End-of-sequence token id, written into exported configs (Llama-3: 128001)."""
    mixer_impl: str = "auto"
    """Mamba-2 compute path: reference (pure PyTorch), kernels (mamba-ssm + causal-conv1d), auto."""
    attn_impl: str = "auto"
    """Attention compute path: sdpa (torch), flash (flash-attn), auto (flash when installed)."""
    doc_masking: bool = False
    """Reset SSM/conv state and mask attention at packed-document boundaries given by doc_ids."""
    check_token_ids: bool = True
    """Check input ids < vocab_size in forward (one host sync on GPU; off if the loader checks)."""
    loss_chunk_tokens: int = 2048
    """Tokens per chunk of the fused LM-head cross-entropy; bounds the fp32 logits alive at once."""
    embedding_init_std: float = 0.02
    """Std of the normal init of the input embedding."""
    dt_min: float = 1e-3
    """Lower end of the log-uniform init of the SSM step size dt."""
    dt_max: float = 0.1
    """Upper end of the log-uniform init of the SSM step size dt."""
    dt_init_floor: float = 1e-4
    """Smallest initial dt, applied after sampling."""
    a_init_min: float = 1.0
    """Lower end of the uniform init of -A (A_log = log U[a_init_min, a_init_max])."""
    a_init_max: float = 16.0
    """Upper end of the uniform init of -A."""

    def __post_init__(self) -> None:
        self.attn_layer_indices = tuple(self.attn_layer_indices)
        self.validate()

    @property
    def head_dim(self) -> int:
        """Attention head dim."""
        return self.hidden_size // self.n_heads

    @property
    def rope_dim(self) -> int:
        """Leading dims of each attention head that RoPE rotates (half of them, as Bamba)."""
        return self.head_dim // 2

    @property
    def mamba_d_inner(self) -> int:
        """Mamba-2 inner width, mamba_expand * hidden_size (validate: = mamba_n_heads * mamba_head_dim)."""
        return self.mamba_expand * self.hidden_size

    @property
    def mamba_conv_dim(self) -> int:
        """Channels through the causal conv: x, B and C."""
        return self.mamba_d_inner + 2 * self.mamba_n_groups * self.mamba_d_state

    def is_attention_layer(self, index: int) -> bool:
        return index in self.attn_layer_indices

    def validate(self) -> None:
        """Raise ValueError naming the field whose value does not fit the others."""
        positive = (
            "vocab_size", "hidden_size", "n_layers", "mlp_hidden_size", "n_heads", "n_kv_heads",
            "mamba_expand", "mamba_n_heads", "mamba_head_dim", "mamba_d_state", "mamba_n_groups",
            "mamba_conv_kernel", "mamba_chunk_size", "max_seq_len", "loss_chunk_tokens",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"BambaConfig.{name} must be a positive integer, got {value!r}")
        if self.mamba_n_heads * self.mamba_head_dim != self.mamba_d_inner:
            raise ValueError(
                f"BambaConfig.mamba_n_heads * mamba_head_dim ({self.mamba_n_heads} * "
                f"{self.mamba_head_dim}) must equal the inner width mamba_expand * hidden_size "
                f"({self.mamba_d_inner})"
            )
        if self.mamba_n_heads % self.mamba_n_groups:
            raise ValueError(
                f"BambaConfig.mamba_n_groups ({self.mamba_n_groups}) must divide "
                f"mamba_n_heads ({self.mamba_n_heads})"
            )
        if self.hidden_size % self.n_heads:
            raise ValueError(
                f"BambaConfig.n_heads ({self.n_heads}) must divide hidden_size ({self.hidden_size})"
            )
        if self.head_dim % 4:
            raise ValueError(
                f"BambaConfig.n_heads: head dim hidden_size // n_heads = {self.head_dim} must be a "
                "multiple of 4 (RoPE rotates half of it in two halves)"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"BambaConfig.n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})"
            )
        for index in self.attn_layer_indices:
            if not isinstance(index, int) or not 0 <= index < self.n_layers:
                raise ValueError(
                    f"BambaConfig.attn_layer_indices: {index!r} is not a layer index in "
                    f"[0, n_layers={self.n_layers})"
                )
        if len(set(self.attn_layer_indices)) != len(self.attn_layer_indices):
            raise ValueError(
                f"BambaConfig.attn_layer_indices has duplicates: {list(self.attn_layer_indices)}"
            )
        if self.mixer_impl not in MIXER_IMPLS:
            raise ValueError(f"BambaConfig.mixer_impl must be one of {MIXER_IMPLS}, got {self.mixer_impl!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"BambaConfig.attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if self.attn_impl == "flash" and self.doc_masking:
            raise ValueError(
                "BambaConfig.attn_impl='flash' does not mask documents; use attn_impl 'sdpa' or "
                "'auto' with doc_masking=True"
            )
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"BambaConfig.dt_min ({self.dt_min}) must be in (0, dt_max={self.dt_max}]")
        if not 0 < self.a_init_min <= self.a_init_max:
            raise ValueError(
                f"BambaConfig.a_init_min ({self.a_init_min}) must be in (0, a_init_max={self.a_init_max}]"
            )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> BambaConfig:
        """A preset (`bamba-9b`, `bamba-1b`, `tiny`) with some fields replaced."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"BambaConfig has no field(s) {unknown}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, BambaConfig] = {
    # Bamba-9B exactly (9,780,235,392 parameters), Llama-3 vocabulary.
    "bamba-9b": BambaConfig(bos_token_id=128000, eos_token_id=128001),
    # ~1.3B with 9B's ratios (MLP 3.5x, d_inner 2x, head dims 128/64, GQA 4:1), 3 attention blocks.
    "bamba-1b": BambaConfig(
        hidden_size=1536, n_layers=24, attn_layer_indices=(7, 14, 21), mlp_hidden_size=5376,
        n_heads=12, n_kv_heads=3, mamba_n_heads=48, bos_token_id=128000, eos_token_id=128001,
    ),
    # CPU-sized, both block kinds, the 4096-token BPE vocabulary of the default CPU run.
    "tiny": BambaConfig(
        vocab_size=4096, hidden_size=64, n_layers=4, attn_layer_indices=(2,), mlp_hidden_size=224,
        n_heads=2, n_kv_heads=1, mamba_n_heads=4, mamba_head_dim=32, mamba_d_state=16,
        mamba_chunk_size=64, max_seq_len=1024,
    ),
}
