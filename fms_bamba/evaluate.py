"""Held-out evaluation during training: the loss on a validation dataset of its own, and a few
fixed prompts completed greedily, every `validation.interval` steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

from data_loader import DataConfig, build_dataloader
from fms_bamba.generate import SamplingConfig, generate_tokens, read_tokenizer
from fms_bamba.model import Bamba

if TYPE_CHECKING:  # config.py imports this module for ValidationConfig
    from fms_bamba.config import JobConfig


@dataclass
class ValidationConfig:
    """Held-out loss (and optionally sample completions), logged with the training metrics."""

    enable: bool = False
    """Evaluate during training."""
    data: DataConfig = field(default_factory=lambda: DataConfig(num_workers=0))
    """The validation dataset (same fields as `data`); read afresh at every evaluation."""
    interval: int = 100
    """Evaluate every N steps; a multiple of metrics.log_interval (the results join that step's record)."""
    batches: int = 10
    """Micro-batches per rank in one evaluation (each training.micro_batch_size x training.seq_len)."""
    prompts: list[str] = field(default_factory=list)
    """Prompts completed greedily at every evaluation and logged as text (needs model.tokenizer)."""
    max_new_tokens: int = 32
    """Tokens generated per prompt."""

    def validate(self, *, log_interval: int, tokenizer: str) -> None:
        """Raise ValueError naming the validation.* field at fault; cheap (no data is read)."""
        if not self.enable:
            return
        for name in ("interval", "batches", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"validation.{name} must be >= 1, got {getattr(self, name)}")
        if self.interval % log_interval:
            raise ValueError(f"validation.interval ({self.interval}) must be a multiple of metrics.log_interval "
                             f"({log_interval}): its results are logged with that step's training metrics")
        try:
            self.data.validate()
        except ValueError as err:
            raise ValueError(f"validation.{err}") from None
        if self.prompts and not tokenizer:
            raise ValueError("validation.prompts need a tokenizer to encode them: set model.tokenizer")
        if not all(isinstance(prompt, str) and prompt for prompt in self.prompts):
            raise ValueError(f"validation.prompts: every prompt must be non-empty text, got {self.prompts!r}")


class Validator:
    """Runs the evaluation at the configured steps; every rank calls it (the loss is all-reduced,
    the model may be sharded), rank 0 prints it."""

    def __init__(self, cfg: JobConfig, model: Bamba, *, rank: int, world_size: int, device: torch.device):
        self.cfg = cfg.validation
        self.job = cfg
        self.model = model
        self.rank, self.world_size, self.device = rank, world_size, device
        self.tokenizer = None
        self.prompt_ids: list[list[int]] = []
        if self.cfg.enable and self.cfg.prompts:
            self.tokenizer = read_tokenizer(cfg.model.tokenizer, "model.tokenizer")
            self.prompt_ids = [self.tokenizer.encode(prompt).ids for prompt in self.cfg.prompts]
            longest = max(len(ids) for ids in self.prompt_ids)
            if not 0 < min(len(ids) for ids in self.prompt_ids) <= longest < model.config.max_seq_len:
                raise ValueError(f"validation.prompts must encode to 1..{model.config.max_seq_len - 1} tokens "
                                 f"(the model's context less one), got {[len(ids) for ids in self.prompt_ids]}")
            self.max_new_tokens = min(self.cfg.max_new_tokens, model.config.max_seq_len - longest)
            if isinstance(model, FSDPModule) or hasattr(model, "per_param_sharding"):
                register_decoding_methods(model)

    def due(self, step: int) -> bool:
        return self.cfg.enable and step % self.cfg.interval == 0

    @torch.no_grad()
    def __call__(self, step: int) -> dict:
        """{} when no evaluation is due at `step`; else `val_loss` (and `val_samples`), in eval mode."""
        if not self.due(step):
            return {}
        model = self.model
        was_training = model.training
        model.eval()
        try:
            record = {"val_loss": self.loss(model)}
            if self.prompt_ids:
                record["val_samples"] = self.samples(model)
        finally:
            model.train(was_training)
        if self.rank == 0:
            print(f"step {step} | val_loss {record['val_loss']:.4f}", flush=True)
            for prompt, completion in zip(self.cfg.prompts, record.get("val_samples", [])):
                print(f"  {prompt!r} -> {completion!r}", flush=True)
        return record

    def loss(self, model: Bamba) -> float:
        """Mean cross-entropy over every validation token of the job: a fresh loader each time, so
        every evaluation reads the same batches and the training loader is never touched."""
        training = self.job.training
        loader = build_dataloader(self.cfg.data, rank=self.rank, world_size=self.world_size,
                                  seq_len=training.seq_len, micro_batch_size=training.micro_batch_size,
                                  vocab_size=model.config.vocab_size)
        totals = torch.zeros(2, device=self.device)  # summed loss, tokens
        for batch in islice(loader, self.cfg.batches):
            batch = {key: value.to(self.device) for key, value in batch.items()}
            tokens = (batch["labels"] != -100).sum()
            loss = model(batch["input_ids"], doc_ids=batch["doc_ids"] if self.job.model.doc_masking else None,
                         labels=batch["labels"])
            totals += torch.stack([loss.float() * tokens, tokens.float()])
        if dist.is_initialized():
            dist.all_reduce(totals)
        loss_sum, tokens = totals.tolist()
        return loss_sum / tokens if tokens else float("nan")

    def samples(self, model: Bamba) -> list[str]:
        """The prompts' greedy continuations, through the recurrent decoding path."""
        sampling = SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=0)
        completions = generate_tokens(model, self.prompt_ids, sampling, eos_token_id=model.config.eos_token_id,
                                      cuda_graph=False)
        return [self.tokenizer.decode(ids) for ids in completions]


def register_decoding_methods(model: Bamba) -> None:
    """Let the sharding (FSDP2 or per-param) gather parameters around the decoding methods as it
    does around forward."""
    sharding = getattr(model, "per_param_sharding", None)
    register = sharding.register_forward_method if sharding is not None else register_fsdp_forward_method
    register(model, "prefill")
    register(model, "decode_step")
    for block in model.layers:
        register(block, "prefill")
        register(block, "step")

