"""Optional GPU kernels: mamba-ssm's fused Mamba-2 path and single-step update (with
causal-conv1d's), and flash-attn.

mamba-ssm 2.3's package `__init__` imports its Mamba-1 CUDA extension (`selective_scan_cuda`),
which Mamba-2 never uses and which builds without CUDA sources lack. So the package module is
registered from its import spec without running its `__init__`, and only the Triton submodule
is imported.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from typing import Callable

INSTALL_HINT = "pip install 'fms-bamba[kernels]'"


def _missing(package: str) -> ImportError:
    return ImportError(f"mixer_impl='kernels' needs the package {package!r}; install it with {INSTALL_HINT}")


def _register_package_without_init(name: str) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise _missing(name.replace("_", "-"))
    sys.modules[name] = importlib.util.module_from_spec(spec)


@functools.cache
def mamba_split_conv1d_scan() -> Callable:
    """mamba-ssm's `mamba_split_conv1d_scan_combined`; ImportError naming what is missing."""
    _register_package_without_init("mamba_ssm")
    for package in ("causal_conv1d", "triton"):
        if importlib.util.find_spec(package) is None:
            raise _missing(package.replace("_", "-"))
    try:
        ssd_combined = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    except ImportError as err:
        raise ImportError(f"mamba-ssm's Triton kernels failed to import ({err}); {INSTALL_HINT}") from err
    if ssd_combined.causal_conv1d_fwd_function is None:
        raise _missing("causal-conv1d")
    return ssd_combined.mamba_split_conv1d_scan_combined


@functools.cache
def mamba_split_conv1d_scan_fn() -> type:
    """MambaSplitConv1dScanCombinedFn, the torch.autograd.Function behind `mamba_split_conv1d_scan`,
    whose static forward and backward the fused op calls."""
    mamba_split_conv1d_scan()  # checks the packages, and registers mamba_ssm without its __init__
    return importlib.import_module("mamba_ssm.ops.triton.ssd_combined").MambaSplitConv1dScanCombinedFn


@functools.cache
def mamba_step_kernels() -> tuple[Callable, Callable]:
    """One decoding step: causal-conv1d's `causal_conv1d_update` and mamba-ssm's
    `selective_state_update`; ImportError naming what is missing."""
    mamba_split_conv1d_scan()  # the same packages: checked, and mamba_ssm registered without __init__
    try:
        conv_update = importlib.import_module("causal_conv1d").causal_conv1d_update
        state_update = importlib.import_module("mamba_ssm.ops.triton.selective_state_update").selective_state_update
    except (ImportError, AttributeError) as err:
        raise ImportError(f"the single-step Mamba-2 kernels failed to import ({err}); {INSTALL_HINT}") from err
    return conv_update, state_update


@functools.cache
def kernels_available() -> bool:
    try:
        mamba_split_conv1d_scan()
    except ImportError:
        return False
    return True


@functools.cache
def flash_attn_func() -> Callable:
    """flash-attn's `flash_attn_func`; ImportError with the install hint when absent."""
    try:
        from flash_attn import flash_attn_func as func
    except ImportError as err:
        raise ImportError(f"attn_impl='flash' needs the package 'flash-attn'; {INSTALL_HINT}") from err
    return func


@functools.cache
def flash_attn_available() -> bool:
    try:
        flash_attn_func()
    except ImportError:
        return False
    return True
