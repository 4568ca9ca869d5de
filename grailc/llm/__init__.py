"""Decoder-only language models (Hugging Face LLaMA family): loading, text calibration, layer-wise compression
through the same trace, analysis and passes as every other model, saving and perplexity."""
