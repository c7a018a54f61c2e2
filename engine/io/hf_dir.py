"""Hugging Face model directories (config.json, *.safetensors [+ index], tokenizer.json),
read as float32 tensors under their HF names into a Checkpoint (engine/io/layout.py).

The families are config.json's model_type (engine/io/config.py FAMILIES: llama, mistral,
qwen2, qwen3, gemma3_text); anything else is refused by name before a tensor is read. Gemma's
norms are stored as w for a (1 + w) RMSNorm: they are read as the multiplier 1 + w."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..util.files import PathError, input_path
from .config import ConfigError, ModelConfig
from .config import FAMILIES
from .layout import (Checkpoint, LazyTensors, WeightsError, check_finite, check_fits, expected_shapes,
                     is_norm_name)
from .safetensors import read_safetensors_header, read_tensor
from .tokenizer import TokenizerError, load_hf_tokenizer

HF_MODEL_TYPES = tuple(FAMILIES)


# ----------------------------------------------------------------------------- Hugging Face directories

MAX_JSON_BYTES = 256 << 20     # config/index/tokenizer JSON; the largest tokenizer.json is ~20 MB


def _checked(path: Path, what: str) -> Path:
    try:
        p = input_path(path, what)
    except PathError as e:
        raise WeightsError(str(e)) from None
    if p.stat().st_size > MAX_JSON_BYTES:
        raise WeightsError(f"{p}: {p.stat().st_size} bytes is far too large for {what}; the file is corrupt")
    return p


def _read_json(path: Path) -> Any:
    _checked(path, "a JSON file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise WeightsError(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"{path}: not valid JSON: {why}") from None


def _weight_files(d: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of an HF directory, and the index's weight map if sharded."""
    index = d / "model.safetensors.index.json"
    if os.path.lexists(index):
        doc = _read_json(index)
        wmap = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise WeightsError(f"{index}: no weight_map")
        files = []
        for fname in dict.fromkeys(wmap.values()):
            if not isinstance(fname, str) or not fname or "/" in fname or "\\" in fname \
                    or fname in (".", "..") or "\0" in fname:
                raise WeightsError(f"{index}: shard name {fname!r} is not a file name in the model "
                                   "directory; the index is corrupt")
            f = d / fname
            if not os.path.lexists(f):
                raise WeightsError(f"{index}: lists shard {fname}, which does not exist")
            try:
                input_path(f, "a safetensors shard")
            except PathError as e:
                raise WeightsError(str(e)) from None
            files.append(f)
        return files, {k: str(v) for k, v in wmap.items()}
    single = d / "model.safetensors"
    if os.path.lexists(single):
        try:
            input_path(single, "model.safetensors")
        except PathError as e:
            raise WeightsError(str(e)) from None
        return [single], None
    if any(d.glob("*.bin")) or any(d.glob("*.pt")) or any(d.glob("*.pth")):
        raise WeightsError(f"{d}: only safetensors weights are supported (found PyTorch pickle "
                           "files; convert them with safetensors first)")
    raise WeightsError(f"{d}: no model.safetensors or model.safetensors.index.json")


def load_hf_dir(path: str | os.PathLike, lazy: bool = False) -> Checkpoint:
    """Load a Hugging Face model directory of a supported family (fp32/fp16/bf16 safetensors)
    as float32.

    Names, shapes and dtypes are checked against the config at once; the tensors themselves
    are read now, or with lazy=True on access (Checkpoint.tensors is then a LazyTensors: a NaN
    is reported when its tensor is read)."""
    try:
        d = input_path(path, "a Hugging Face model", kind="dir")
    except PathError as e:
        raise WeightsError(str(e)) from None
    cfg_path = d / "config.json"
    if not os.path.lexists(cfg_path):
        raise WeightsError(f"{d}: no config.json (not a Hugging Face model directory)")
    cfg = _read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise WeightsError(f"{cfg_path}: not a JSON object")
    try:
        config = ModelConfig.from_hf(cfg)
    except ConfigError as e:
        raise WeightsError(f"{cfg_path}: {e}") from None

    files, wmap = _weight_files(d)
    headers = {f: read_safetensors_header(f) for f in files}       # (entries, metadata, data start)
    # Against what the files really hold, before anything is sized from the config.
    check_fits(config, cfg_path, sum(len(h[0]) for h in headers.values()),
               sum(f.stat().st_size for f in files), min_bits=16)
    want = expected_shapes(config)
    loaders = {}
    where: dict[str, Path] = {}
    for f in files:
        header, _, start = headers[f]
        for name, e in header.items():
            if name not in want:
                # HF itself ignores these two: a stored lm_head of a tied model, RoPE buffers.
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    continue
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                raise WeightsError(f"{f}: unexpected tensor {name}; is this a {config.model_type} checkpoint "
                                   "as its config.json says?")
            if name in where:
                raise WeightsError(f"{f}: tensor {name} is also stored in {where[name].name}")
            if tuple(e["shape"]) != want[name]:
                raise WeightsError(f"{f}: tensor {name} has shape {tuple(e['shape'])}, "
                                   f"the config needs {want[name]}")
            if e["dtype"] not in ("F32", "F16", "BF16"):
                raise WeightsError(f"{f}: tensor {name} has dtype {e['dtype']}; "
                                   "expected F32, F16 or BF16")
            if wmap is not None and wmap.get(name) != f.name:
                raise WeightsError(f"{f}: holds tensor {name}, which the index places in "
                                   f"{wmap.get(name)!r}")
            where[name] = f
            offset = config.norm_offset if is_norm_name(name) else 0.0
            loaders[name] = _loader(f, start, e, name, offset)
    for name, shape in want.items():
        if name not in loaders:
            listed = f" (the index places it in {wmap[name]})" if wmap and name in wmap else ""
            raise WeightsError(f"{d}: missing tensor {name} with shape {shape}{listed}")
    lazy_tensors = LazyTensors({n: loaders[n] for n in want}, want)    # canonical order
    if lazy:
        tensors = lazy_tensors
    else:
        by_file = sorted(want, key=lambda n: (files.index(where[n]), headers[where[n]][0][n]["data_offsets"][0]))
        tensors = {n: lazy_tensors[n] for n in by_file}               # read in file order
        tensors = {n: tensors[n] for n in want}

    try:
        tokenizer, template = load_hf_tokenizer(d)
    except TokenizerError as e:
        raise WeightsError(str(e)) from None
    return Checkpoint(config, tensors, tokenizer, template, str(d))


def _loader(f: Path, start: int, e: dict, name: str, offset: float = 0.0):
    """offset: added to a norm weight stored as w for a (1 + w) RMSNorm (Gemma), in float32 as
    transformers does (1.0 + w.float())."""
    def load() -> np.ndarray:
        a = read_tensor(f, start, e, name)
        check_finite(name, a, f)
        a = a.astype(np.float32, copy=False)
        return a + np.float32(offset) if offset else a
    return load
