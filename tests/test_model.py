"""Bamba: shapes, document masking, loss, init, parameter groups, FLOPs and bad input."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from fms_bamba.model import Bamba, BambaConfig, num_flops_per_token, optimizer_param_groups
from fms_bamba.model.attention import Attention
from fms_bamba.model.mamba2 import Mamba2Mixer


def small_config(**overrides) -> BambaConfig:
    """Both block kinds, a chunk that does not divide the test lengths."""
    return BambaConfig.from_preset("tiny", **{"mamba_chunk_size": 8, "n_layers": 3, "attn_layer_indices": (1,), **overrides})


def make_model(seed=0, **overrides) -> Bamba:
    torch.manual_seed(seed)
    return Bamba(small_config(**overrides))


def test_bamba_9b_has_exactly_the_published_parameter_count():
    with torch.device("meta"):
        model = Bamba(BambaConfig.from_preset("bamba-9b"))
    assert sum(p.numel() for p in model.parameters()) == 9_780_235_392
    assert [i for i, layer in enumerate(model.layers) if isinstance(layer.mixer, Attention)] == [9, 18, 27]
    mixer = model.layers[0].mixer
    assert mixer.in_proj.weight.shape == (16768, 4096)
    assert mixer.out_proj.weight.shape == (4096, 8192)


def test_flops_per_token_bamba_9b():
    flops = num_flops_per_token(BambaConfig.from_preset("bamba-9b"), 4096)
    assert abs(flops / 1e9 - 56.5) <= 0.6
    # attention's causal score term grows with the sequence
    assert num_flops_per_token(BambaConfig.from_preset("bamba-9b"), 8192) > flops


def test_presets():
    one_b = BambaConfig.from_preset("bamba-1b")
    assert len(one_b.attn_layer_indices) == 3 and one_b.mlp_hidden_size / one_b.hidden_size == 3.5
    tiny = BambaConfig.from_preset("tiny")
    assert tiny.vocab_size == 4096 and 0 < len(tiny.attn_layer_indices) < tiny.n_layers
    assert BambaConfig.from_preset("tiny", doc_masking=True).doc_masking


def test_forward_shapes_any_length():
    model = make_model()
    for seq_len in (1, 8, 21):
        logits = model(torch.randint(0, 4096, (2, seq_len)))
        assert logits.shape == (2, seq_len, 4096) and torch.isfinite(logits).all()


def packed_and_alone(model, lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, sum(lengths)), generator=gen)
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    return ids, doc_ids


@pytest.mark.parametrize("mixer", ["mamba", "attention"])
def test_doc_masked_mixer_equals_each_document_alone(mixer):
    cfg = small_config(doc_masking=True)
    torch.manual_seed(0)
    module = Attention(cfg) if mixer == "attention" else Bamba(cfg).layers[0].mixer
    assert isinstance(module, Attention if mixer == "attention" else Mamba2Mixer)
    lengths = [7, 1, 12, 10]
    x = torch.randn(1, sum(lengths), cfg.hidden_size)
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    packed = module(x, doc_ids)
    start = 0
    for length in lengths:
        alone = module(x[:, start : start + length])
        torch.testing.assert_close(packed[:, start : start + length], alone, rtol=1e-5, atol=1e-5)
        start += length
    # without masking the later documents see the earlier ones
    assert not torch.allclose(module(x)[:, lengths[0]:], packed[:, lengths[0]:], atol=1e-3)


def test_doc_masked_model_equals_each_document_alone():
    model = make_model(doc_masking=True).eval()
    lengths = [11, 3, 17]
    ids, doc_ids = packed_and_alone(model, lengths)
    with torch.no_grad():
        packed = model(ids, doc_ids=doc_ids)
        start = 0
        for length in lengths:
            alone = model(ids[:, start : start + length], doc_ids=torch.zeros(1, length, dtype=torch.long))
            torch.testing.assert_close(packed[:, start : start + length], alone, rtol=1e-4, atol=1e-4)
            start += length


def test_doc_ids_ignored_without_doc_masking():
    model = make_model().eval()
    ids, doc_ids = packed_and_alone(model, [5, 9])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, doc_ids=doc_ids), model(ids))


def test_loss_is_chunked_mean_cross_entropy_with_ignored_labels():
    model = make_model(loss_chunk_tokens=7)
    ids = torch.randint(0, 4096, (3, 10))
    labels = torch.randint(0, 4096, (3, 10))
    labels[0, :4] = -100
    labels[2, 7] = -100
    loss = model(ids, labels=labels)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    (grad_chunked,) = torch.autograd.grad(loss, model.output.weight)
    logits = model(ids)
    expected = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    (grad_full,) = torch.autograd.grad(expected, model.output.weight)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad_chunked, grad_full)
    single_chunk = make_model(loss_chunk_tokens=4096)
    torch.testing.assert_close(single_chunk(ids, labels=labels), expected)
    nothing = model(ids, labels=torch.full_like(labels, -100))
    assert nothing.item() == 0.0


def test_init_follows_the_original_trainer():
    model = make_model(seed=3, n_layers=4, attn_layer_indices=(2,), hidden_size=128, mamba_n_heads=8)
    cfg = model.config
    mixer = model.layers[0].mixer
    A = mixer.A_log.exp()
    assert ((A >= 1) & (A <= 16)).all() and A.std() > 1
    dt = F.softplus(mixer.dt_bias)
    assert ((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001)).all()
    assert (mixer.D == 1).all() and (mixer.norm.weight == 1).all() and (model.norm.weight == 1).all()
    assert abs(model.tok_embeddings.weight.std().item() - 0.02) < 0.002
    fan_in_bound = 1 / math.sqrt(cfg.hidden_size)
    assert model.layers[0].mlp.up_proj.weight.abs().max() <= fan_in_bound
    assert model.layers[0].mlp.up_proj.weight.abs().max() > 0.9 * fan_in_bound
    residual_bound = 1 / math.sqrt(cfg.mlp_hidden_size) / math.sqrt(2 * cfg.n_layers)
    down = model.layers[0].mlp.down_proj.weight.abs().max()
    assert 0.9 * residual_bound < down <= residual_bound
    out_bound = 1 / math.sqrt(cfg.mamba_d_inner) / math.sqrt(2 * cfg.n_layers)
    assert mixer.out_proj.weight.abs().max() <= out_bound
    assert model.layers[2].mixer.o_proj.weight.abs().max() <= 1 / math.sqrt(cfg.hidden_size) / math.sqrt(2 * cfg.n_layers)


def test_meta_build_then_materialise_and_init():
    cfg = small_config()
    with torch.device("meta"):
        model = Bamba(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    torch.manual_seed(0)
    model.init_weights()  # must overwrite every parameter
    eager = Bamba(cfg)
    torch.manual_seed(0)
    eager.init_weights()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert torch.isfinite(p).all(), name
        torch.testing.assert_close(p, q, msg=name)
    assert torch.isfinite(model(torch.randint(0, 4096, (1, 9)))).all()


def test_optimizer_param_groups_keep_vectors_out_of_weight_decay():
    model = make_model()
    decay, no_decay = optimizer_param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    for suffix in ("A_log", "mixer.D", "dt_bias", "conv_bias", "norm.weight", "mixer_norm.weight"):
        assert any(n.endswith(suffix) for n in no_decay_names), suffix
        assert not any(n.endswith(suffix) for n in decay_names), suffix
    assert {"tok_embeddings.weight", "output.weight", "layers.0.mixer.in_proj.weight"} <= decay_names
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))


def test_backward_reaches_every_parameter():
    model = make_model()
    model(torch.randint(0, 4096, (2, 13)), labels=torch.randint(0, 4096, (2, 13))).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"mamba_n_heads": 6}, "mamba_n_heads"),
        ({"mamba_head_dim": 16}, "mamba_n_heads * mamba_head_dim"),
        ({"attn_layer_indices": (4,)}, "attn_layer_indices"),
        ({"attn_layer_indices": (-1,)}, "attn_layer_indices"),
        ({"n_kv_heads": 3, "n_heads": 4, "hidden_size": 64}, "n_kv_heads"),
        ({"n_heads": 3}, "n_heads"),
        ({"mamba_n_groups": 3}, "mamba_n_groups"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"mixer_impl": "cuda"}, "mixer_impl"),
        ({"attn_impl": "flash", "doc_masking": True}, "attn_impl"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"BambaConfig.{field}".replace("*", r"\*")):
        small_config(**overrides)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown model preset 'bamba-7b'"):
        BambaConfig.from_preset("bamba-7b")
    with pytest.raises(ValueError, match="no field"):
        BambaConfig.from_preset("tiny", hidden=3)


def test_token_id_outside_vocab_is_a_clear_error():
    model = make_model()
    with pytest.raises(ValueError, match="token id 4096 is outside the vocabulary"):
        model(torch.tensor([[1, 4096, 2]]))
    with pytest.raises(ValueError, match="token id -1 is outside"):
        model(torch.tensor([[1, -1]]))
    ids = torch.tensor([[1, 2, 3]])
    for labels in ([[2, 3, -5]], [[2, 4096, -100]]):  # -100 is ignored; any other id must be a row
        with pytest.raises(ValueError, match=r"1 labels are neither -100 nor in \[0, vocab_size=4096\)"):
            model(ids, labels=torch.tensor(labels))
    # the trainer turns the check off when its loader validates ids; then embedding raises
    unchecked = make_model(check_token_ids=False)
    with pytest.raises(IndexError):
        unchecked(torch.tensor([[1, 4096, 2]]))


def test_bad_forward_inputs():
    model = make_model()
    ids = torch.randint(0, 4096, (2, 5))
    with pytest.raises(ValueError, match="labels shape"):
        model(ids, labels=ids[:, :4])
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, model.config.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(ids.float())
    with pytest.raises(ValueError, match="doc_masking is on but forward got no doc_ids"):
        make_model(doc_masking=True)(ids)


@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is not None, reason="mamba-ssm is installed")
def test_kernels_without_mamba_ssm_name_the_package_and_the_extra():
    with pytest.raises(ImportError, match=r"mamba-ssm.*fms-bamba\[kernels\]"):
        make_model(mixer_impl="kernels")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_without_flash_attn_names_the_package_and_the_extra():
    with pytest.raises(ImportError, match=r"flash-attn.*fms-bamba\[kernels\]"):
        make_model(attn_impl="flash")
