"""Checkpoints in and out: Hugging Face directories, raw safetensors, GGUF files, the
q.safetensors file, the model config, tokenizers and chat templates, text corpora.
May import engine.formats and engine.util; nothing above them."""
