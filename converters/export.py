"""Write a Checkpoint as a Hugging Face model directory (config, safetensors, tokenizer).

The directory is built in a temporary sibling and moved into place with os.replace,
so a reader never sees half a model. The safetensors carry {"format": "pt"} metadata,
which transformers requires, so the export loads there as well as in this engine.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from engine.io.tokenizer import token_string
from engine.io.layout import Checkpoint, WeightsError, check_tensors, expected_shapes, is_norm_name
from engine.io.safetensors import write_safetensors
from engine.util.files import (PathError, clean_stale, forget_temporary, is_within, out_path,
                               register_temporary, temp_sibling, write_reason)

DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}   # name -> bytes per element
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


# Every export carries this file, so --overwrite can tell a directory this tool wrote (safe to
# replace) from anything else (never deleted: a user's files may be in it).
MARKER = ".dgq-export"


class ExportError(ValueError):
    """An export that cannot be written as asked (bad option, occupied target)."""


def check_out_dir(out_dir, overwrite: bool = False, sources=()) -> Path:
    """The export target, checked before anything is loaded or written: not one of (or above)
    the `sources`; a new path, an empty directory, or with overwrite a directory an earlier
    export wrote (it holds MARKER). Returns it as an absolute path."""
    try:
        out = out_path(out_dir, "--out")
    except PathError as e:
        raise ExportError(str(e)) from None
    for src in sources:
        if src is not None and os.path.lexists(src) and (is_within(src, out) or is_within(out, src)):
            raise ExportError(f"--out {out_dir}: the output would overlap the input {src}; "
                              "choose a directory outside it")
    if is_within(os.getcwd(), out):
        raise ExportError(f"--out {out_dir}: is (or holds) the current directory, which the export would "
                          "replace under this shell; give the path of a new directory")
    if os.path.lexists(out) and not out.is_dir():
        raise ExportError(f"--out {out_dir}: exists and is not a directory")
    if out.is_dir():
        try:
            entries = [e.name for e in os.scandir(out)]
        except OSError as e:
            raise ExportError(f"--out {out_dir}: cannot read the directory: {e.strerror or e}") from None
        if entries and not overwrite:
            raise ExportError(f"--out {out_dir}: directory exists and is not empty "
                              + ("(pass --overwrite / overwrite=True to replace this earlier export)" if MARKER in entries
                                 else "and was not written by dgq-export; pick a new or empty directory"))
        if entries and MARKER not in entries:
            raise ExportError(f"--out {out_dir}: not a directory written by dgq-export (no {MARKER} file); "
                              "--overwrite only replaces earlier exports. Remove it yourself or pick another path")
    parent = out.parent                            # missing parents are created: check the nearest one
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ExportError(f"--out {out_dir}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"--out {out_dir}: no permission to write in {parent}")
    return out


def parse_size(size: int | str) -> int:
    """Bytes from 123, "500MB", "2GB" or "1GiB" (the units transformers' max_shard_size takes)."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise ExportError(f"--shard-size: shard size must be bytes or a size like '2GB', got {size!r}")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ExportError(f"--shard-size: shard size must be positive, got {size!r}")
    return n


def _plan_shards(sizes: dict[str, int], shard_size: int | None) -> list[list[str]]:
    """Consecutive tensors packed greedily into shards of at most shard_size bytes
    (a tensor larger than that gets a shard of its own)."""
    if shard_size is None:
        return [list(sizes)]
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        if shards[-1] and used + n > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def export_hf_dir(ckpt: Checkpoint, out_dir: str | os.PathLike, dtype: str = "float32",
                  shard_size: int | str | None = None, overwrite: bool = False) -> Path:
    """Write `ckpt` as an HF directory of its family (config.to_hf) in `dtype`; return its path.

    shard_size (bytes or "2GB") splits the weights into model-0000i-of-0000n.safetensors
    plus model.safetensors.index.json; None writes one model.safetensors.
    An existing non-empty out_dir is an error unless overwrite=True.
    """
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    limit = None if shard_size is None else parse_size(shard_size)
    try:
        check_tensors(ckpt.config, ckpt.tensors, where=f"checkpoint {ckpt.source}")
    except WeightsError as e:
        raise ExportError(str(e)) from None
    given = out_dir
    out = check_out_dir(out_dir, overwrite, sources=[ckpt.source])
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"--out {given}: cannot create {out.parent}: {e.strerror or e}") from None
    clean_stale(out)                               # leftovers of a killed earlier export

    tmp = temp_sibling(out, "tmp")
    register_temporary(tmp, is_dir=True)           # removed on SIGTERM/SIGHUP too
    try:
        tmp.mkdir()                                # not mkdtemp: its 0700 mode would stick
        _write_dir(ckpt, tmp, dtype, limit)
        if out.is_dir() and any(out.iterdir()):
            old = temp_sibling(out, "old")
            os.replace(out, old)                   # rename() cannot replace a non-empty directory
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)               # put the previous model back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)                   # replaces an empty directory too
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = write_reason(out, e, creating=e.filename == os.fspath(tmp))
        raise ExportError(f"--out {given}: cannot write the export: {why}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        forget_temporary(tmp)
    return Path(out_dir)


def _write_dir(ckpt: Checkpoint, d: Path, dtype: str, limit: int | None) -> None:
    cfg = ckpt.config
    _write_json(d / MARKER, {"written_by": "dgq-export", "dtype": dtype})
    hf = cfg.to_hf()
    hf["torch_dtype"] = dtype
    _write_json(d / "config.json", hf)
    gen = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id") if getattr(cfg, k) is not None}
    if gen:
        _write_json(d / "generation_config.json", gen)

    names = list(expected_shapes(cfg))             # canonical order: layers stay together
    sizes = {n: ckpt.tensors[n].size * DTYPES[dtype] for n in names}

    def tensor(n):
        # HF Gemma stores w of a (1 + w) norm; in memory we hold the multiplier (io/layout.py)
        a = ckpt.tensors[n]
        return a - np.float32(cfg.norm_offset) if cfg.norm_offset and is_norm_name(n) else a

    shards = _plan_shards(sizes, limit)
    meta = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(d / "model.safetensors", {n: tensor(n) for n in names}, meta,
                          float_dtype=dtype)
    else:
        weight_map = {}
        for i, group in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(d / fname, {n: tensor(n) for n in group}, meta, float_dtype=dtype)
            weight_map.update({n: fname for n in group})
        _write_json(d / "model.safetensors.index.json",
                    {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})

    tok = ckpt.tokenizer
    if tok is not None:
        tok.save(str(d / "tokenizer.json"))
    if tok is not None or ckpt.chat_template:
        tc = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": cfg.max_position_embeddings}
        if tok is not None:
            for key, tid in (("bos_token", cfg.bos_token_id), ("eos_token", cfg.eos_token_id)):
                if token_string(tok, tid):
                    tc[key] = token_string(tok, tid)
        if ckpt.chat_template:
            tc["chat_template"] = ckpt.chat_template
        _write_json(d / "tokenizer_config.json", tc)


def _write_json(path: Path, obj) -> None:
    # Only ever called inside the temporary directory, so a plain write is atomic enough.
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
