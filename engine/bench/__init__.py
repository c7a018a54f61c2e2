"""Benchmarks of the GPU engine, run as `python -m engine.bench <subcommand>` (see __main__.py).
May import any engine package; nothing in the engine imports it."""
