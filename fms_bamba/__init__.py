"""fms-bamba: pretraining framework for hybrid Mamba-2/attention language models."""
