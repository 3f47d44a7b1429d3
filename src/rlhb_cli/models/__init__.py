"""Tokenizers, the tiny default model, loading any local Hugging Face model, and judge backbones."""
