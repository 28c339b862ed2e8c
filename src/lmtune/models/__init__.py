"""Models: loading (HF folder, hub id, GGUF, the embedded default), quantization, adapters."""
