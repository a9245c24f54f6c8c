"""Flax linen modules: tokenizer, transformer, discriminator."""
