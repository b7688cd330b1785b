"""Streaming, resumable, multi-dataset token loader, and the tokenizer that writes its shards."""

from data_loader.accounting import DocumentRef, consumed_documents, describe_progress
from data_loader.config import DataConfig
from data_loader.loader import TokenDataLoader, build_dataloader

__all__ = ["DataConfig", "DocumentRef", "TokenDataLoader", "build_dataloader", "consumed_documents", "describe_progress"]
