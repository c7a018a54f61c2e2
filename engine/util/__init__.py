"""Small helpers that several rooms need, kept once and below all of them: array-module
lookup without importing CuPy, atomic file writes, process memory, progress on stderr, errors
about one parameter. Imports nothing of ours."""
