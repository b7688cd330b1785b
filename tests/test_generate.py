"""`fms-bamba generate`: greedy tokens equal transformers' generate on the exported folder, ragged
prompts in one batch, sampling, EOS, streaming from a run directory, bad input before any weight."""

import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from checkpoints_tools.common import write_model_checkpoint
from checkpoints_tools.hf import export_hf
from fms_bamba import generate
from fms_bamba.cli import main as cli_main
from fms_bamba.generate import SamplingConfig, copy_tokenizer, generate_tokens, load_model, resolve_source, sample
from fms_bamba.model import Bamba, BambaConfig

GREEDY = SamplingConfig(max_new_tokens=12, temperature=0)
PROMPTS = [[5, 17, 300, 42, 7, 99, 1000, 3], [12, 8], [4000, 1, 2, 3, 4]]


def tiny_config(**overrides) -> BambaConfig:
    # both block kinds; chunk 8 so the prompts and decoding cross chunk boundaries
    return BambaConfig.from_preset("tiny", mamba_chunk_size=8, max_seq_len=48, **overrides)


def write_run(run_dir: Path, config: BambaConfig, tokenizer: Path | None = None) -> Path:
    """A run directory as the trainer leaves it: config.yaml, tokenizer/, checkpoints/step-N."""
    torch.manual_seed(0)
    state = Bamba(config).state_dict()
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("{}\n")
    if tokenizer is not None:
        (run_dir / "tokenizer").mkdir()
        (run_dir / "tokenizer" / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return write_model_checkpoint(run_dir / "checkpoints" / "step-00000003", state, config, {"format": "test"})


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    """A 300-token byte-level BPE, trained in a blink on this file."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([Path(__file__).read_text()] * 4, trainer)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer_file) -> Path:
    run_dir = tmp_path_factory.mktemp("gen") / "run"
    write_run(run_dir, tiny_config(), tokenizer_file)
    return run_dir


def test_greedy_matches_transformers_generate(run, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_dir = export_hf(run, tmp_path / "hf")
    source = resolve_source(run)
    assert source.kind == "checkpoint" and source.path.name == "step-00000003"
    ours = generate_tokens(load_model(source, device=torch.device("cpu"), dtype=torch.float32), PROMPTS, GREEDY)

    hf_model = transformers.BambaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    for prompt, tokens in zip(PROMPTS, ours):
        # one prompt at a time: our batch is left-padded, transformers' run is not
        expected = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                     do_sample=False, max_new_tokens=GREEDY.max_new_tokens, pad_token_id=0)
        assert tokens == expected[0, len(prompt):].tolist()

    # the exported folder itself is a SOURCE (Bamba.from_hf), with the run's tokenizer copied in
    hf_source = resolve_source(hf_dir)
    assert hf_source.kind == "transformers" and hf_source.tokenizer == hf_dir / "tokenizer.json"
    hf_ours = load_model(hf_source, device=torch.device("cpu"), dtype=torch.float32)
    assert generate_tokens(hf_ours, PROMPTS, GREEDY) == ours


def test_eos_ends_each_row_where_it_first_appears(run):
    model = load_model(resolve_source(run), device=torch.device("cpu"), dtype=torch.float32)
    free = generate_tokens(model, PROMPTS, GREEDY)
    eos = free[0][4]
    ended = generate_tokens(model, PROMPTS, GREEDY, eos_token_id=eos)
    assert ended == [row[: row.index(eos)] if eos in row else row for row in free]
    assert len(ended[0]) <= 4
    streamed = []
    generate_tokens(model, PROMPTS[:1], GREEDY, eos_token_id=eos, on_tokens=streamed.append)
    assert [step[0] for step in streamed] == ended[0] + [eos]  # stops once every row has ended


def test_sampling_rules():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2), -math.inf]]).expand(20000, -1)
    gen = torch.Generator().manual_seed(0)

    def frequencies(**kwargs) -> torch.Tensor:
        tokens = sample(logits, SamplingConfig(**{"temperature": 1.0, "top_p": 1.0, **kwargs}), gen)
        return torch.bincount(tokens, minlength=4).float() / len(tokens)

    torch.testing.assert_close(frequencies(), torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.015, rtol=0)
    torch.testing.assert_close(frequencies(top_k=2), torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015, rtol=0)
    # top_p 0.6: 0.5 alone falls short, so the second token stays; the third is outside
    torch.testing.assert_close(frequencies(top_p=0.6), torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015, rtol=0)
    assert frequencies(top_k=1)[0] == 1 and frequencies(top_p=0.1)[0] == 1
    sharp = sample(logits, SamplingConfig(temperature=0.05, top_p=1.0), gen)
    assert (sharp == 0).float().mean() > 0.99


def test_seeded_sampling_repeats(run):
    model = load_model(resolve_source(run), device=torch.device("cpu"), dtype=torch.float32)
    hot = SamplingConfig(max_new_tokens=10, temperature=1.5, top_p=1.0, seed=3)
    first = generate_tokens(model, PROMPTS, hot)
    assert generate_tokens(model, PROMPTS, hot) == first
    assert generate_tokens(model, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=1.5, top_p=1.0, seed=4)) != first


def test_cli_streams_from_a_run_directory(run, tmp_path, capsys, tokenizer_file):
    prompt = "def test_greedy(run):"
    assert cli_main(["generate", str(run), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "9"]) == 0
    out = capsys.readouterr().out
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    model = load_model(resolve_source(run), device=torch.device("cpu"), dtype=torch.float32)
    expected = generate_tokens(model, [tokenizer.encode(prompt).ids], SamplingConfig(max_new_tokens=9, temperature=0))
    assert out == prompt + tokenizer.decode(expected[0]) + "\n"

    # a batch file: ragged prompts in one batch, each continuation as alone
    prompts = ["import torch", "x = 1", "class Model(nn.Module):\n".strip()]
    batch_file = tmp_path / "prompts.txt"
    batch_file.write_text("\n".join(prompts) + "\n")
    assert cli_main(["generate", str(run), "--batch-file", str(batch_file), "--temperature", "0",
                     "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    for number, text in enumerate(prompts, start=1):
        alone = generate_tokens(model, [tokenizer.encode(text).ids], SamplingConfig(max_new_tokens=6, temperature=0))
        assert f"--- {number} ---\n{text}{tokenizer.decode(alone[0])}\n" in out


@pytest.fixture(scope="module")
def small_vocab_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("small") / "run"
    write_run(run_dir, tiny_config(vocab_size=256))
    return run_dir


@pytest.mark.parametrize("make_args, message", [
    (lambda run, small, tmp: [run, "--prompt", ""], "--prompt is empty"),
    (lambda run, small, tmp: [run, "--prompt", "x" * 400], "longer than the model's context"),
    (lambda run, small, tmp: [tmp / "nowhere", "--prompt", "hi"], "does not exist"),
    (lambda run, small, tmp: [tmp, "--prompt", "hi"], "not a run directory, a checkpoint or a transformers"),
    (lambda run, small, tmp: [small, "--prompt", "hi", "--tokenizer", run / "tokenizer"], "has 300 tokens but the model"),
    (lambda run, small, tmp: [small, "--prompt", "hi"], "no tokenizer stored with it"),
    (lambda run, small, tmp: [run, "--prompt", "hi", "--top-p", "0"], "--top-p"),
    (lambda run, small, tmp: [run, "--prompt", "hi", "--batch-file", "x"], "exactly one of"),
])
def test_bad_input_fails_before_any_weight_loads(run, small_vocab_run, tmp_path, capsys, monkeypatch, make_args, message):
    monkeypatch.setattr(generate, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    argv = [str(arg) for arg in make_args(run, small_vocab_run, tmp_path)]
    assert cli_main(["generate", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_long_batch_file_line_is_named(run, tmp_path, capsys):
    long_line = "x" * 400
    for lines in ([long_line], ["x = 1", long_line]):  # a one-line file is not "--prompt" either
        batch_file = tmp_path / f"{len(lines)}-lines.txt"
        batch_file.write_text("\n".join(lines) + "\n")
        assert cli_main(["generate", str(run), "--batch-file", str(batch_file)]) == 2
        assert f"--batch-file: {batch_file} line {len(lines)} is " in capsys.readouterr().err


def test_decode_step_refuses_past_the_caches(run):
    model = load_model(resolve_source(run), device=torch.device("cpu"), dtype=torch.float32)
    _, state = model.prefill(torch.tensor([PROMPTS[1]]), max_new_tokens=1)
    model.decode_step(torch.tensor([3]), state)
    with pytest.raises(ValueError, match="caches are full"):
        model.decode_step(torch.tensor([3]), state)


def test_copy_tokenizer_takes_tokenizer_files_only(tmp_path):
    """A model folder given as the tokenizer: its tokenizer files are copied, its weights are not;
    a single file becomes tokenizer.json."""
    model_folder = tmp_path / "model"
    model_folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors", "config.json"):
        (model_folder / name).write_text(name)
    copy_tokenizer(model_folder, tmp_path / "run" / "tokenizer")
    assert sorted(p.name for p in (tmp_path / "run" / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    copy_tokenizer(model_folder / "tokenizer.json", tmp_path / "single")
    assert (tmp_path / "single" / "tokenizer.json").read_text() == "tokenizer.json"
