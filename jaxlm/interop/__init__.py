"""Interop with other ecosystems (Hugging Face checkpoints, tokenizers, PEFT adapters)."""
