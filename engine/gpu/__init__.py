"""The GPU engine: the only package that imports CuPy (gpu/backend.py, lazily), the kernel
loader, launchers of every CUDA kernel in cuda/, and the CuPy model.
May import engine.formats, engine.io, engine.model and engine.util."""
