"""`fms-bamba generate SOURCE --prompt TEXT`: text from a run, a checkpoint or a transformers
Bamba folder.

The prompts are prefilled through the chunked path in one batch (left-padded when their lengths
differ), then each new token is one recurrent step: conv + SSM state in the Mamba-2 blocks, a KV
cache in the attention blocks. On GPU that step runs mamba-ssm's and causal-conv1d's
single-step kernels (when installed) and is replayed as a CUDA graph.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from fms_bamba.checkpoint import iter_tensors, read_meta, resolve_checkpoint
from fms_bamba.model import Bamba, BambaConfig
from fms_bamba.model.decode import CudaGraphDecoder
from fms_bamba.model.hf_mapping import read_hf_config

# --dtype names, here and in bamba-ckpt
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass
class SamplingConfig:
    """How the next token is chosen."""

    max_new_tokens: int = 128
    """Tokens to generate per prompt at most (fewer where EOS comes first or the context ends)."""
    temperature: float = 0.8
    """Softmax temperature; 0 = greedy (argmax)."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0 = all)."""
    top_p: float = 0.95
    """Sample among the most likely tokens whose probabilities sum to top_p (1 = all)."""
    seed: int = 0
    """Seed of the sampling generator: the same seed gives the same text."""

    def validate(self) -> None:
        """Raise ValueError naming the option that is out of range."""
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """logits [B, V] -> next tokens [B], on the device, with no host sync."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth_largest = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if cfg.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the more likely ones already reach top_p (the first always stays)
        outside = probs.cumsum(-1) - probs >= cfg.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    probs = logits.softmax(-1)
    # argmax of p_i / E_i with E_i ~ Exp(1) picks i with probability p_i; unlike
    # torch.multinomial it never waits for the device
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(-1)


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts (token ids) as one batch [B, longest], left-padded with 0, and their lengths [B] for
    `Bamba.prefill` (None when every prompt is as long: nothing to mask)."""
    lengths = [len(prompt) for prompt in prompts]
    if min(lengths) < 1:
        raise ValueError("every prompt needs at least one token")
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
    return ids, torch.tensor(lengths) if min(lengths) < width else None


@torch.no_grad()
def generate_tokens(
    model: Bamba,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    *,
    eos_token_id: int | None = None,
    on_tokens: Callable[[list[int]], None] | None = None,
    cuda_graph: bool = True,
) -> list[list[int]]:
    """Continue every prompt (token ids, lengths may differ) by up to sampling.max_new_tokens
    tokens, in one batch; a row ends at eos_token_id (not returned). on_tokens, when given, gets
    each step's tokens (one per row) as they come, which waits for the device every step;
    without it the loop waits only every 32 steps, to see whether every row has ended."""
    device = model.output.weight.device
    batch, new_tokens = len(prompts), sampling.max_new_tokens
    ids, prompt_lengths = left_pad(prompts)
    # the last sampled token is never fed back: the caches need room for new_tokens - 1
    logits, state = model.prefill(ids.to(device), prompt_lengths, max_new_tokens=new_tokens - 1)
    if cuda_graph and device.type == "cuda":
        step = CudaGraphDecoder(model, state, batch)
    else:
        step = partial(model.decode_step, state=state)
    generator = torch.Generator(device).manual_seed(sampling.seed)
    generated = torch.empty(batch, new_tokens, dtype=torch.long, device=device)
    ended = torch.zeros(batch, dtype=torch.bool, device=device)
    for i in range(new_tokens):
        tokens = sample(logits, sampling, generator)
        if eos_token_id is not None:
            tokens = tokens.masked_fill(ended, eos_token_id)  # an ended row keeps saying EOS
            ended |= tokens == eos_token_id
        generated[:, i] = tokens
        if on_tokens is not None:
            on_tokens(tokens.tolist())
        if i == new_tokens - 1:
            break
        if eos_token_id is not None and (on_tokens is not None or i % 32 == 31) and bool(ended.all()):
            generated = generated[:, : i + 1]
            break
        logits = step(tokens)
    rows = generated.tolist()
    return [row[: row.index(eos_token_id)] if eos_token_id in row else row for row in rows]


@dataclass
class Source:
    """What SOURCE names: the weights, their model config, the tokenizer stored beside them."""

    kind: str
    """"checkpoint" (a framework checkpoint) or "transformers" (a BambaForCausalLM folder)."""
    path: Path
    """The checkpoint directory or the transformers folder."""
    config: BambaConfig
    """The model config the weights belong to."""
    tokenizer: Path | None
    """tokenizer.json found with the weights (the run's tokenizer/, the folder's file), if any."""


def runtime_neutral(config: BambaConfig) -> BambaConfig:
    """`config` with the compute-path choices reset: they belong to a run, not to the weights, and
    'kernels' / 'flash' would demand GPU packages just to read shapes."""
    return dataclasses.replace(config, mixer_impl="auto", attn_impl="auto")


def model_config_of(meta: dict, source: str | os.PathLike) -> BambaConfig:
    """The model config a checkpoint's meta.json records.

    Checkpoints written by the import tools carry `model_config` (BambaConfig's fields); the
    trainer's carry the job config, from which the model config is built as the trainer builds it.
    """
    if isinstance(meta.get("model_config"), dict):
        try:
            return runtime_neutral(BambaConfig(**meta["model_config"]))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: meta.json model_config is not a valid BambaConfig ({err})") from None
    job = meta.get("config")
    if isinstance(job, dict) and isinstance(job.get("model"), dict):
        # imported here: fms_bamba.config imports this module (through evaluate), train imports config
        from fms_bamba.config import ConfigError, load_job_config
        from fms_bamba.train import build_model_config

        overrides = {f"model.{key}": value for key, value in job["model"].items()}
        seq_len = (job.get("training") or {}).get("seq_len")
        if seq_len is not None:
            overrides["training.seq_len"] = seq_len
        try:
            return runtime_neutral(build_model_config(load_job_config(None, overrides)))
        except ConfigError as err:
            raise ValueError(f"{source}: meta.json's job config does not give a model ({err})") from None
    raise ValueError(f"{source}: meta.json records neither a model_config nor a job config with a model section")


def find_tokenizer(ckpt_dir: Path) -> Path | None:
    """The run's tokenizer/ folder when the checkpoint lies in a run dir (RUN/checkpoints/step-N)."""
    run_dir = ckpt_dir.parent.parent
    tokenizer = run_dir / "tokenizer"
    return tokenizer if (run_dir / "config.yaml").is_file() and tokenizer.is_dir() else None


def resolve_source(source: str | Path) -> Source:
    """Read what SOURCE is and its model config, without loading any weight."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"SOURCE {path} does not exist: give a run directory, a checkpoint or a transformers Bamba folder")
    if (path / "config.json").is_file():
        tokenizer = path / "tokenizer.json"
        return Source("transformers", path, read_hf_config(path), tokenizer if tokenizer.is_file() else None)
    try:
        ckpt = resolve_checkpoint(path)
        config = model_config_of(read_meta(ckpt), ckpt)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"SOURCE {path} is not a run directory, a checkpoint or a transformers Bamba folder: {err}") from None
    run_tokenizer = find_tokenizer(ckpt)
    return Source("checkpoint", ckpt, config, None if run_tokenizer is None else tokenizer_file(run_tokenizer))


def tokenizer_file(path: str | Path) -> Path:
    """A tokenizer.json given as itself or as the folder holding it."""
    path = Path(path)
    return path / "tokenizer.json" if path.is_dir() else path


# Files that make up a tokenizer (transformers' and the tokenizers library's); a model folder
# given as the tokenizer also holds weights, which must not be copied along.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model")


def copy_tokenizer(source: str | Path, target: str | Path) -> None:
    """Copy a tokenizer into the folder `target`: a file becomes target/tokenizer.json; from a folder,
    the tokenizer files among TOKENIZER_FILES that it has."""
    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    if source.is_file():
        shutil.copy2(source, target / "tokenizer.json")
        return
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def read_tokenizer(path: str | Path, option: str) -> Tokenizer:
    """The tokenizer at `path` (a tokenizer.json or its folder); errors name `option` and the file."""
    file = tokenizer_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"{option}: {file} does not exist")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # the tokenizers library raises plain Exception on a malformed file
        raise ValueError(f"{option}: {file} is not a tokenizers tokenizer.json ({err})") from None


def load_tokenizer(path: Path | None, source: Source) -> Tokenizer:
    """The tokenizer at `path` (a tokenizer.json or a folder holding one), else SOURCE's; its
    vocabulary must fit in the model's."""
    if path is None:
        if source.tokenizer is None or not source.tokenizer.is_file():
            raise FileNotFoundError(f"{source.path} has no tokenizer stored with it; pass --tokenizer PATH")
        path = source.tokenizer
    tokenizer = read_tokenizer(path, "--tokenizer")
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab > source.config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer_file(path)} has {vocab} tokens but the model {source.path} only "
                         f"{source.config.vocab_size}: not the model's tokenizer")
    return tokenizer


def load_model(source: Source, *, device: torch.device, dtype: torch.dtype) -> Bamba:
    """Bamba in eval mode on `device` with `dtype` weights. Inputs come from the tokenizer, checked
    once, so the per-call token-id check (a host sync) is off; generation needs no doc masking."""
    runtime = {"check_token_ids": False, "doc_masking": False}
    if source.kind == "transformers":
        model = Bamba.from_hf(source.path, dtype=dtype, **runtime)
    else:
        # cast as each tensor is read, so no more than one stored-dtype tensor is held at once
        state = {key.removeprefix("model."): tensor.to(dtype) for key, tensor in iter_tensors(source.path)}
        model = Bamba.from_state_dict(dataclasses.replace(source.config, **runtime), state)
    return model.to(device).eval()


def read_prompts(prompt: str | None, batch_file: str | None) -> list[str]:
    if (prompt is None) == (batch_file is None):
        raise ValueError("give exactly one of --prompt TEXT and --batch-file F")
    if prompt is not None:
        if not prompt:
            raise ValueError("--prompt is empty")
        return [prompt]
    path = Path(batch_file)
    if not path.is_file():
        raise FileNotFoundError(f"--batch-file: {path} does not exist")
    prompts = path.read_text().splitlines()
    if not prompts:
        raise ValueError(f"--batch-file: {path} holds no prompt (one prompt a line)")
    for number, line in enumerate(prompts, start=1):
        if not line:
            raise ValueError(f"--batch-file: {path} line {number} is an empty prompt")
    return prompts


def encode_prompts(
    tokenizer: Tokenizer, prompts: list[str], config: BambaConfig, batch_file: str | None = None
) -> list[list[int]]:
    """Token ids of each prompt (from --prompt, or the lines of batch_file); each must leave room
    for a new token in the model's context."""
    encoded = [tokenizer.encode(text).ids for text in prompts]
    for number, ids in enumerate(encoded, start=1):
        where = "--prompt" if batch_file is None else f"--batch-file: {batch_file} line {number}"
        if not ids:
            raise ValueError(f"{where} encodes to no tokens")
        if len(ids) >= config.max_seq_len:
            raise ValueError(f"{where} is {len(ids)} tokens, longer than the model's context allows "
                             f"(max_seq_len {config.max_seq_len}, and one new token needs a position)")
    return encoded


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    return device


def parse_args(argv: list[str]) -> argparse.Namespace:
    defaults = SamplingConfig()
    parser = argparse.ArgumentParser(prog="fms-bamba generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", metavar="SOURCE",
                        help="run directory (its latest complete checkpoint), checkpoint directory, or transformers Bamba folder")
    parser.add_argument("--prompt", help="text to continue")
    parser.add_argument("--batch-file", help="file of prompts, one a line, generated as one batch")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="0 = off")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="1 = off")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--tokenizer", help="tokenizer.json or a folder holding one (default: the one stored with SOURCE)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32")
    parser.add_argument("--eos-token-id", type=int, help="stop a row at this token (default: the model config's EOS)")
    parser.add_argument("--no-cuda-graph", action="store_true", help="run each decoding step eagerly")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """Check everything that can be wrong, then load the weights and generate; exit code."""
    args = parse_args(argv)
    try:
        sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
        sampling.validate()
        device = pick_device(args.device)
        dtype_name = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        if dtype_name not in DTYPES:
            raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {args.dtype!r}")
        texts = read_prompts(args.prompt, args.batch_file)
        source = resolve_source(args.source)
        tokenizer = load_tokenizer(Path(args.tokenizer) if args.tokenizer else None, source)
        prompts = encode_prompts(tokenizer, texts, source.config, args.batch_file)
        room = source.config.max_seq_len - max(len(ids) for ids in prompts)
        if sampling.max_new_tokens > room:
            print(f"fms-bamba generate: the model's context (max_seq_len {source.config.max_seq_len}) leaves "
                  f"room for {room} new tokens; generating {room}", file=sys.stderr)
            sampling.max_new_tokens = room
    except (OSError, ValueError) as err:
        print(f"fms-bamba generate: error: {err}", file=sys.stderr)
        return 2

    model = load_model(source, device=device, dtype=DTYPES[dtype_name])
    eos = args.eos_token_id if args.eos_token_id is not None else source.config.eos_token_id
    generate = partial(generate_tokens, model, prompts, sampling, eos_token_id=eos, cuda_graph=not args.no_cuda_graph)
    if len(prompts) == 1:
        stream = DecodeStream(skip_special_tokens=True)
        for token in prompts[0]:  # the prompt is the context the first new tokens decode in
            stream.step(tokenizer, token)
        print(texts[0], end="", flush=True)

        def show(tokens: list[int]) -> None:
            if tokens[0] != eos and (piece := stream.step(tokenizer, tokens[0])):
                print(piece, end="", flush=True)

        generate(on_tokens=show)
        print()
        return 0
    for number, (text, new) in enumerate(zip(texts, generate()), start=1):
        print(f"--- {number} ---\n{text}{tokenizer.decode(new, skip_special_tokens=True)}", flush=True)
    return 0
