"""Bamba, the hybrid Mamba-2 / attention language model."""

from fms_bamba.model.bamba import Bamba, optimizer_param_groups
from fms_bamba.model.config import PRESETS, BambaConfig
from fms_bamba.model.flops import num_flops_per_token

__all__ = ["Bamba", "BambaConfig", "PRESETS", "num_flops_per_token", "optimizer_param_groups"]
