"""DGQ engine: A8W4 dual-grained quantized LLM inference with a NumPy reference path."""
__version__ = "0.1.0"
