"""The fused Mamba-2 custom op on CPU: the kernel's output layouts, opcheck, gradients, and a
decoder block compiled in one graph (fullgraph) through it, matching the eager reference path."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.common import aot_autograd
from torch._subclasses.fake_tensor import FakeTensorMode
from functorch.compile import make_boxed_func

from fms_bamba.model import Bamba, BambaConfig
from fms_bamba.model.fused_mixer_op import split_conv1d_scan_bwd, split_conv1d_scan_fwd
from fms_bamba.model.ssd import split_conv1d_scan

BATCH, SEQ_LEN = 2, 13  # 13: not a multiple of the chunk


@pytest.fixture(scope="module")
def block():
    """One Mamba-2 block: 2 groups (so rstd's group-major layout matters), chunk 4, weights moved
    off their init (D = 1, norm weight = 1)."""
    torch.manual_seed(0)
    config = BambaConfig.from_preset(
        "tiny", n_layers=1, attn_layer_indices=(), mamba_n_groups=2, mamba_chunk_size=4, mamba_d_state=8
    )
    block = Bamba(config).layers[0]
    with torch.no_grad():
        for param in block.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return block


def doc_ids(seed=0):
    starts = torch.rand(BATCH, SEQ_LEN, generator=torch.Generator().manual_seed(seed)) < 0.2
    return starts.long().cumsum(1)


def op_inputs(mixer, docs: bool, dtype=torch.float32, requires_grad=False):
    """(zxbcdt, the seven weights, seq_idx, chunk_size, n_groups, eps) for the forward op."""
    zxbcdt = torch.randn(BATCH, SEQ_LEN, mixer.in_proj.out_features, generator=torch.Generator().manual_seed(1))
    weights, settings = mixer.scan_inputs()
    # A (index 4) stays fp32, as mixer.A() gives it
    tensors = [t.detach().to(torch.float32 if i == 4 else dtype) for i, t in enumerate((zxbcdt, *weights))]
    tensors = [t.requires_grad_(requires_grad) for t in tensors]
    return (*tensors, doc_ids().int() if docs else None, *settings)


def fake_and_real(op, args):
    """The op's outputs from its fake and from its CPU kernel."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    return fake, op(*args)


def layouts(tensors):
    return [(tuple(t.shape), t.dtype, t.stride()) for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_return_the_kernels_layouts(block, dtype):
    """Forward: out [b, s, hidden] and y [b, s, h, p] in zxbcdt's dtype, rstd [g*b*s] and the state
    [b, h, p, n] in fp32; backward: each gradient as its input; all contiguous, from the fake and
    from the CPU kernel alike."""
    cfg = block.mixer.config
    args = op_inputs(block.mixer, docs=True, dtype=dtype)
    expected = [
        torch.empty(BATCH, SEQ_LEN, cfg.hidden_size, dtype=dtype),
        torch.empty(BATCH, SEQ_LEN, cfg.mamba_n_heads, cfg.mamba_head_dim, dtype=dtype),
        torch.empty(cfg.mamba_n_groups * BATCH * SEQ_LEN),
        torch.empty(BATCH, cfg.mamba_n_heads, cfg.mamba_head_dim, cfg.mamba_d_state),
    ]
    for outputs in fake_and_real(split_conv1d_scan_fwd, args):
        assert layouts(outputs) == layouts(expected)
    zxbcdt, *weights, seq_idx, chunk_size, n_groups, eps = args
    out, y, rstd, _ = split_conv1d_scan_fwd(*args)
    bwd_args = (torch.randn_like(out), zxbcdt, *weights, seq_idx, y, rstd, chunk_size, n_groups, eps)
    for grads in fake_and_real(split_conv1d_scan_bwd, bwd_args):
        assert layouts(grads) == layouts([zxbcdt, *weights])


def test_y_and_rstd_are_what_the_kernels_backward_reads(block):
    """out = out_proj(norm_weight * y * silu(z) * rstd), with rstd indexed [group * (b*s) + row]
    as mamba-ssm's layer norm stores it."""
    zxbcdt, *weights, seq_idx, chunk_size, n_groups, eps = op_inputs(block.mixer, docs=True)
    norm_weight, out_proj_weight = weights[-2:]
    out, y, rstd, _ = split_conv1d_scan_fwd(zxbcdt, *weights, seq_idx, chunk_size, n_groups, eps)
    z = zxbcdt[..., : norm_weight.shape[0]]
    gated = (y.flatten(-2) * F.silu(z)).unflatten(-1, (n_groups, -1))  # [b, s, g, d/g]
    normed = gated * rstd.view(n_groups, BATCH, SEQ_LEN).permute(1, 2, 0).unsqueeze(-1)
    torch.testing.assert_close(out, F.linear(norm_weight * normed.flatten(-2), out_proj_weight))


@pytest.mark.parametrize("docs", [False, True])
def test_opcheck_forward_and_backward(block, docs):
    """Schema, fake, autograd registration and AOT dispatch of both ops (the forward with inputs
    that need grad, so its registered backward is traced too)."""
    torch.library.opcheck(split_conv1d_scan_fwd, op_inputs(block.mixer, docs, requires_grad=True))
    zxbcdt, *weights, seq_idx, chunk_size, n_groups, eps = op_inputs(block.mixer, docs)
    out, y, rstd, _ = split_conv1d_scan_fwd(zxbcdt, *weights, seq_idx, chunk_size, n_groups, eps)
    dout = torch.randn_like(out)
    torch.library.opcheck(split_conv1d_scan_bwd, (dout, zxbcdt, *weights, seq_idx, y, rstd, chunk_size, n_groups, eps))


@pytest.mark.parametrize("docs", [False, True])
def test_op_gradients_equal_autograd_through_the_reference(block, docs):
    zxbcdt, *weights, seq_idx, chunk_size, n_groups, eps = op_inputs(block.mixer, docs, requires_grad=True)
    inputs = [zxbcdt, *weights]
    dout = torch.randn(BATCH, SEQ_LEN, block.mixer.config.hidden_size, generator=torch.Generator().manual_seed(2))
    results = []
    for fn in (split_conv1d_scan_fwd, split_conv1d_scan):
        out = fn(*inputs, seq_idx, chunk_size, n_groups, eps)[0]
        results.append((out, torch.autograd.grad(out, inputs, dout)))
    torch.testing.assert_close(results[0], results[1])


def recording_aot_eager(graphs: dict):
    """aot_eager that also keeps the forward and backward graphs it is given."""

    def keep(kind):
        def compiler(graph, example_inputs):
            graphs.setdefault(kind, []).append(graph)
            return make_boxed_func(graph.forward)
        return compiler

    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))


def op_calls(graph, op) -> int:
    return sum(node.target == op.default for node in graph.graph.nodes)


@pytest.mark.parametrize("docs", [False, True])
def test_compiled_block_is_one_graph_with_the_op_as_one_node(block, docs, monkeypatch):
    """torch.compile(fullgraph=True) of a Mamba-2 block through the op: no graph break, the kernel
    one node forward and one backward, and the eager reference path's outputs and gradients."""
    x = torch.randn(BATCH, SEQ_LEN, block.mixer.config.hidden_size, generator=torch.Generator().manual_seed(3))
    ids = doc_ids() if docs else None

    def outputs_and_grads(fn):
        block.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_()
        out = fn(inp, ids)
        out.backward(torch.cos(out.detach()))
        return out, inp.grad, {name: p.grad for name, p in block.named_parameters()}

    expected = outputs_and_grads(block)  # eager, the reference path
    graphs = {}
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=recording_aot_eager(graphs))
    monkeypatch.setattr(block.mixer, "use_kernels", lambda hidden: True)  # the op stands in for the kernels
    actual = outputs_and_grads(compiled)
    assert [len(graphs[kind]) for kind in ("forward", "backward")] == [1, 1]
    assert op_calls(graphs["forward"][0], torch.ops.fms_bamba.split_conv1d_scan_fwd) == 1
    assert op_calls(graphs["backward"][0], torch.ops.fms_bamba.split_conv1d_scan_bwd) == 1
    torch.testing.assert_close(actual, expected)
