"""Step-wise decoding (conv + SSM state, KV cache) reproduces the full-sequence forward."""

import dataclasses

import pytest
import torch

from fms_bamba.model import Bamba, BambaConfig
from fms_bamba.model.fused_mixer_op import split_conv1d_scan_fwd
from fms_bamba.model.ssd import causal_conv1d, causal_conv1d_step, ssd_chunked_scan, ssd_step


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # both block kinds; chunk 8 so prompts span several chunks
    return Bamba(BambaConfig.from_preset("tiny", mamba_chunk_size=8, max_seq_len=64)).eval()


def test_steps_continue_the_chunked_scan_and_conv():
    gen = torch.Generator().manual_seed(0)
    batch, seq_len, heads, head_dim, groups, d_state, channels = 2, 19, 4, 3, 2, 5, 6
    x = torch.randn(batch, seq_len, heads, head_dim, generator=gen, dtype=torch.float64)
    dt = torch.rand(batch, seq_len, heads, generator=gen, dtype=torch.float64)
    A = -torch.rand(heads, generator=gen, dtype=torch.float64) - 0.1
    B = torch.randn(batch, seq_len, groups, d_state, generator=gen, dtype=torch.float64)
    C = torch.randn(batch, seq_len, groups, d_state, generator=gen, dtype=torch.float64)
    y_all = ssd_chunked_scan(x, dt, A, B, C, chunk_size=4)
    prefix = 11
    _, state = ssd_chunked_scan(x[:, :prefix], dt[:, :prefix], A, B[:, :prefix], C[:, :prefix], 4, return_final_state=True)
    for t in range(prefix, seq_len):
        torch.testing.assert_close(ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t]), y_all[:, t])

    signal = torch.randn(batch, seq_len, channels, generator=gen, dtype=torch.float64)
    weight = torch.randn(channels, 4, generator=gen, dtype=torch.float64)
    bias = torch.randn(channels, generator=gen, dtype=torch.float64)
    conv_all = causal_conv1d(signal, weight, bias)
    window = signal[:, prefix - 3 : prefix].transpose(1, 2).contiguous()
    for t in range(prefix, seq_len):
        torch.testing.assert_close(causal_conv1d_step(window, signal[:, t], weight, bias), conv_all[:, t])


def test_decoding_ragged_prompts_matches_full_forward(model):
    gen = torch.Generator().manual_seed(1)
    lengths = [13, 5, 1, 9]
    new_tokens = 7
    width = max(lengths)
    sequences = [torch.randint(0, 4096, (n + new_tokens,), generator=gen) for n in lengths]
    # left-padded with random tokens: padding must not leak into any row
    prompts = torch.randint(0, 4096, (len(lengths), width), generator=gen)
    for row, (seq, n) in enumerate(zip(sequences, lengths)):
        prompts[row, width - n :] = seq[:n]
    with torch.no_grad():
        expected = [model(seq[None])[0] for seq in sequences]  # [n + new_tokens, V] each

    logits, state = model.prefill(prompts, prompt_lengths=torch.tensor(lengths), max_new_tokens=new_tokens)
    for step in range(new_tokens + 1):
        for row, n in enumerate(lengths):
            torch.testing.assert_close(logits[row], expected[row][n - 1 + step], rtol=1e-4, atol=1e-4)
        if step < new_tokens:
            logits = model.decode_step(torch.stack([seq[n + step] for seq, n in zip(sequences, lengths)]), state)
    assert state.position == width + new_tokens


def test_decoding_without_padding_and_greedy_consistency(model):
    ids = torch.randint(0, 4096, (2, 10), generator=torch.Generator().manual_seed(2))
    logits, state = model.prefill(ids, max_new_tokens=3)
    generated = ids
    for _ in range(3):
        token = logits.argmax(-1)
        generated = torch.cat([generated, token[:, None]], dim=1)
        logits = model.decode_step(token, state)
    with torch.no_grad():
        full = model(generated)
    # every generated token is the argmax of the full forward at the position before it
    torch.testing.assert_close(full[:, 9:-1].argmax(-1), generated[:, 10:])
    torch.testing.assert_close(logits, full[:, -1], rtol=1e-4, atol=1e-4)


def test_decoding_bad_input(model):
    ids = torch.randint(0, 4096, (2, 10))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.prefill(ids, max_new_tokens=60)
    with pytest.raises(ValueError, match="prompt_lengths"):
        model.prefill(ids, prompt_lengths=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.prefill(torch.full((1, 3), 4096))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -2"):
        model.prefill(ids, max_new_tokens=-2)


def test_decoding_a_doc_masked_model(model):
    """A model trained with doc masking decodes as well: prefill makes its own doc_ids from the
    padding, so the config's flag changes nothing."""
    masked = Bamba(dataclasses.replace(model.config, doc_masking=True)).eval()
    masked.load_state_dict(model.state_dict())
    ids = torch.randint(0, 4096, (2, 6), generator=torch.Generator().manual_seed(3))
    outputs = []
    for net in (model, masked):
        logits, state = net.prefill(ids, prompt_lengths=torch.tensor([6, 4]), max_new_tokens=1)
        outputs.append((logits, net.decode_step(logits.argmax(-1), state)))
    torch.testing.assert_close(outputs[1], outputs[0])


def test_fused_prefill_goes_in_slices_under_the_int32_limit(model, monkeypatch):
    """A batch whose in_proj output exceeds the kernels' int32 offsets is scanned in slices of
    rows, and the slices' outputs and final states join in order (on CPU the fused op runs the
    reference scan)."""
    mixer = model.layers[0].mixer
    calls = []

    def counted_op(zxbcdt, *args):
        calls.append(zxbcdt.shape[0])
        return split_conv1d_scan_fwd(zxbcdt, *args)

    monkeypatch.setattr("fms_bamba.model.mamba2.split_conv1d_scan_fwd", counted_op)
    zxbcdt = torch.randn(5, 12, mixer.in_proj.out_features)
    doc_ids = (torch.arange(12) >= torch.tensor([0, 3, 7, 1, 11])[:, None]).long()
    whole = mixer.fused_forward(zxbcdt, doc_ids)
    whole_plain = mixer.fused_forward(zxbcdt, None)
    monkeypatch.setattr("fms_bamba.model.mamba2.KERNEL_MAX_ELEMENTS", 2 * zxbcdt[0].numel())
    sliced = mixer.fused_forward(zxbcdt, doc_ids)
    torch.testing.assert_close(mixer.fused_forward(zxbcdt, None), whole_plain)
    assert calls == [5, 5, 2, 2, 1, 2, 2, 1]
    torch.testing.assert_close(sliced, whole)
