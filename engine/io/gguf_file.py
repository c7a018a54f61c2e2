"""llama.cpp GGUF files of the llama, qwen2, qwen3 and gemma3 architectures: every tensor
dequantized to float32 in the HF layout (llama.cpp's q/k row permutation undone for llama),
the config rebuilt as the HF config.json it was converted from (ModelConfig.from_hf reads it),
the tokenizer (byte-level or SentencePiece BPE) and chat template rebuilt.

What llama.cpp's converter changed and we take back: llama q/k rows permuted for its
adjacent-pair RoPE (the other three keep HF's order); Llama 3.1's RoPE scaling stored as a
rope_freqs tensor of per-frequency divisors (we recognise the llama3 rule in it); Gemma's norms
stored as 1 + w (what we hold anyway), its sliding-window pattern (every 6th layer global) and
local RoPE base 10000 fixed by llama.cpp unless the file says otherwise.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..util.files import PathError, input_path
from .config import ConfigError, ModelConfig, rope_inv_freq
from .layout import Checkpoint, LazyTensors, WeightsError, check_finite, check_fits, expected_shapes
from .tokenizer import TokenizerError, chat_template_from_gguf, gguf_value, tokenizer_from_gguf


# ----------------------------------------------------------------------------- GGUF

# GGUF architecture -> HF model_type.
GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
# Gemma 3's four norms a layer: ffn_norm is then the MLP's input norm.
_GGUF_SANDWICH_NAMES = {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                        "post_ffw_norm": "post_feedforward_layernorm"}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def gguf_to_hf_name(name: str, sandwich: bool = False) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (also .bias); None when
    unknown. sandwich: Gemma 3's names for the four norms of a layer."""
    stem, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if stem in _GGUF_TOP_NAMES and kind == "weight":
        return _GGUF_TOP_NAMES[stem] + ".weight"
    parts = stem.split(".")
    names = {**_GGUF_LAYER_NAMES, **_GGUF_SANDWICH_NAMES} if sandwich else _GGUF_LAYER_NAMES
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in names:
        return f"model.layers.{int(parts[1])}.{names[parts[2]]}.{kind}"
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
        try:
            return gguf_value(fields[key])
        except Exception as e:  # a corrupt field: bad UTF-8, a truncated array, ...
            raise WeightsError(f"{path}: GGUF key {key!r} is corrupt ({type(e).__name__})") from None
    if default is WeightsError:
        raise WeightsError(f"{path}: GGUF file lacks the key {key!r}")
    return default


def _gguf_int(fields: dict, path: Path, key: str, default: Any = WeightsError) -> Any:
    v = _gguf_kv(fields, path, key, default)
    if v is None and default is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise WeightsError(f"{path}: GGUF key {key!r} must be an integer, got {str(v)[:40]!r}")
    return int(v)


def _gguf_float(fields: dict, path: Path, key: str, default: float) -> float:
    v = _gguf_kv(fields, path, key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise WeightsError(f"{path}: GGUF key {key!r} must be a number, got {str(v)[:40]!r}")
    return _f32_value(v)


def load_gguf(path: str | os.PathLike, lazy: bool = False) -> Checkpoint:
    """Load a GGUF of a GGUF_ARCHS architecture: dequantize every tensor to float32 in HF layout.

    Names and shapes are checked at once; the tensors are dequantized now, or with lazy=True
    each when it is asked for (Checkpoint.tensors is then a LazyTensors). Either way a tensor is
    read through its own short-lived memory map of the file, so walking the model does not
    keep the pages already read resident."""
    import gguf  # noqa: PLC0415  (only GGUF loading needs it)

    try:
        path = input_path(path, "a GGUF file")
    except PathError as e:
        raise WeightsError(str(e)) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")           # the reader warns about duplicate keys, ...
            reader = _plain_reader(gguf)(path)
        f = reader.fields
        by_name = {t.name: t for t in reader.tensors}
    except Exception as e:  # the reader raises ValueError/struct.error/IndexError/... on bad files
        msg = " ".join(str(e).split())[:160]
        raise WeightsError(f"{path}: not a readable GGUF file: truncated or corrupt "
                           f"(the gguf reader says {type(e).__name__}: {msg})") from None
    if len(by_name) != len(reader.tensors):
        raise WeightsError(f"{path}: corrupt GGUF file: a tensor name appears twice")
    # Byte ranges against the file's real size, and no two sharing bytes (the reader checks
    # neither: a lying offset would alias one tensor's data as another's, silently).
    size = path.stat().st_size
    ranges = sorted((int(t.data_offset), int(t.data_offset) + int(t.n_bytes), t.name) for t in reader.tensors)
    for b, e, name in ranges:
        if e > size:
            raise WeightsError(f"{path}: truncated GGUF file: tensor {name} ends at byte {e}, "
                               f"the file holds {size}")
    for (b0, e0, n0), (b1, e1, n1) in zip(ranges, ranges[1:]):
        if b1 < e0 and e0 > b0 and e1 > b1:
            raise WeightsError(f"{path}: corrupt GGUF file: tensors {n0} [{b0}, {e0}) and {n1} "
                               f"[{b1}, {e1}) share bytes")
    arch = _gguf_kv(f, path, "general.architecture")
    if not isinstance(arch, str) or arch not in GGUF_ARCHS:
        raise WeightsError(f"{path}: GGUF architecture {arch!r} is not supported "
                           f"(only {', '.join(repr(a) for a in GGUF_ARCHS)})")
    config = _gguf_config(f, path, arch, by_name)
    # Against what the file really holds, before anything is sized from the config
    # (1 bit a parameter: below every GGML quantization type).
    check_fits(config, path, len(reader.tensors), path.stat().st_size, min_bits=1)

    want = expected_shapes(config)
    loaders = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":                 # read by _gguf_config: the llama3 scaling
            continue
        name = gguf_to_hf_name(t.name, sandwich=config.sandwich_norm)
        if name is None or name not in want:
            raise WeightsError(f"{path}: unsupported tensor {t.name} in a {arch} GGUF "
                               f"(the {config.model_type} layout has no {name or 'such tensor'})")
        want_n = int(np.prod(want[name], dtype=np.int64))
        if int(np.prod([int(x) for x in t.shape], dtype=np.int64)) != want_n:
            raise WeightsError(f"{path}: tensor {t.name} has shape {tuple(int(x) for x in reversed(t.shape))}, "
                               f"the config needs {want[name]} for {name}")
        heads = None
        if arch == "llama":                               # only llama's q/k rows are permuted
            n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
            heads = n_head if name.endswith("q_proj.weight") else n_kv if name.endswith("k_proj.weight") else None
        loaders[name] = _loader(path, t, name, want[name], heads)
    for name, shape in want.items():
        if name not in loaders:
            raise WeightsError(f"{path}: missing tensor for {name} (shape {shape})")
    if lazy:
        tensors = LazyTensors({n: loaders[n] for n in want}, want)
    else:
        tensors = {n: loaders[n]() for n in loaders}                 # in file order
        tensors = {n: tensors[n] for n in want}

    try:
        tokenizer = tokenizer_from_gguf(f)
        template = chat_template_from_gguf(f)
    except TokenizerError as e:
        raise WeightsError(f"{path}: {e}") from None
    except Exception as e:  # a corrupt vocabulary field (bad UTF-8, wrong element type, ...)
        raise WeightsError(f"{path}: the GGUF tokenizer fields are corrupt ({type(e).__name__})") from None
    if template is not None and not isinstance(template, str):
        raise WeightsError(f"{path}: tokenizer.chat_template is not a string")
    del reader, by_name                              # drop the file mapping
    return Checkpoint(config, tensors, tokenizer, template, str(path))


def _plain_reader(gguf):
    """gguf.GGUFReader parsing a plain ndarray view of its memory map. The reader slices its `data`
    once or more for every metadata element (the vocabulary and merges: ~100k strings), and a slice
    of an np.memmap runs memmap.__array_finalize__ each time: 2.2 s of SmolLM2's load on the
    development CPU, 0.74 s through the view (the same fields: tests/test_weights.py). The view's
    base is the map, so dropping the reader still drops the mapping.

    Arrays of strings and of numbers (in a file of the machine's byte order) are also read by a
    loop of its own: the same parts (a string's uint64 length and its bytes, a number's
    one-element array: views of `data`) without gguf's recursion into every element. Before
    gguf or the loop reads a string or array value, its length is checked against the bytes left
    (at the smallest size an element can take), so a lying length is an error, not a short part
    or a walk over 2^63 empty elements (in either byte order)."""
    t = gguf.GGUFValueType
    string, array = t.STRING, t.ARRAY
    least = {string: 8, array: 12}                          # bytes an element takes at the least

    class PlainReader(gguf.GGUFReader):
        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, mm):
            self._plain = mm.view(np.ndarray) if isinstance(mm, np.ndarray) else mm

        def _get_field_parts(self, orig_offs, raw_type):
            data, end = self._plain, len(self._plain)
            if raw_type not in (string, array):
                return super()._get_field_parts(orig_offs, raw_type)
            head = 8 if raw_type == string else 12              # a string's length; an array's type + length
            if orig_offs + head > end:
                raise ValueError(f"a value at byte {orig_offs} runs past the end of the file")
            if raw_type == string:
                if int(self._get(orig_offs, np.uint64)[0]) > end - orig_offs - 8:
                    raise ValueError(f"a string at byte {orig_offs} runs past the end of the file")
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            n = int(alen[0])
            try:
                itype = t(int(raw_itype[0]))
            except ValueError:                                   # gguf's to judge (an empty one passes)
                itype = None
            scalar = self.gguf_scalar_to_np.get(itype)
            each = np.dtype(scalar).itemsize if scalar is not None else least.get(itype, 1)
            if n > (end - orig_offs - 12) // each:
                raise ValueError(f"an array of {n} values at byte {orig_offs} runs past the end of the file")
            if (scalar is None and itype != string) or getattr(self, "byte_order", "I") != "I":
                return super()._get_field_parts(orig_offs, raw_type)   # nested, unknown, byte-swapped
            offs, parts = orig_offs + 12, [raw_itype, alen]
            if scalar is not None:                               # an element a part, as gguf has them
                vals = data[offs:offs + n * each].view(scalar)
                parts += [vals[i:i + 1] for i in range(n)]
                offs += n * each
            else:                                                # each string: its length, its bytes
                buf = memoryview(data)
                for _ in range(n):
                    if offs + 8 > end:
                        raise ValueError(f"a string array runs past the end of the file at byte {offs}")
                    k = int.from_bytes(buf[offs:offs + 8], sys.byteorder)
                    if k > end - offs - 8:
                        raise ValueError(f"a string of {k} bytes at byte {offs} runs past the end of the file")
                    parts += (data[offs:offs + 8].view(np.uint64), data[offs + 8:offs + 8 + k])
                    offs += 8 + k
            idxs = list(range(2, len(parts))) if scalar is not None else list(range(3, len(parts), 2))
            return offs - orig_offs, parts, idxs, [array] + ([itype] if n else [])
    return PlainReader


def _loader(path: Path, t, name: str, shape: tuple, heads: int | None):
    """Read, dequantize and check one tensor (undoing the q/k row permutation when heads is
    set). Only plain facts of `t` are kept, not the reader and its whole-file mapping."""
    import gguf  # noqa: PLC0415

    gname, qtype, offset = t.name, t.tensor_type, int(t.data_offset)
    dtype, dshape = t.data.dtype, tuple(int(x) for x in t.data.shape)
    want_n = int(np.prod(shape, dtype=np.int64))

    def load() -> np.ndarray:
        try:
            mm = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=dshape)
        except (OSError, ValueError) as e:
            raise WeightsError(f"{path}: cannot read tensor {gname} (the file changed or was "
                               f"truncated after it was opened: {getattr(e, 'strerror', None) or e})") from None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                w = _dequantize(gguf, mm.view(np.ndarray), qtype)           # no memmap slices (above)
            if np.may_share_memory(w, mm):   # F32 tensors come back as views of the mapping
                w = np.array(w, dtype=np.float32)
            w = np.ascontiguousarray(w, dtype=np.float32)                # (N, K) or (K,)
        except NotImplementedError:
            raise WeightsError(f"{path}: tensor {gname} has type {qtype.name}, "
                               "which gguf cannot dequantize") from None
        except Exception as e:                   # a block count that does not fit the shape, ...
            msg = " ".join(str(e).split())[:120]
            raise WeightsError(f"{path}: tensor {gname} is corrupt ({type(e).__name__}: {msg})") from None
        finally:
            del mm
        if w.size != want_n:
            raise WeightsError(f"{path}: tensor {gname} holds {w.size} values, "
                               f"{name} needs {want_n} (truncated or corrupt file)")
        if tuple(w.shape) != shape:
            raise WeightsError(f"{path}: tensor {gname} has shape {tuple(w.shape)}, "
                               f"the config needs {shape} for {name}")
        check_finite(gname, w, path)
        return unpermute_qk(w, heads) if heads else w
    return load


def _dequantize(gguf, data: np.ndarray, qtype) -> np.ndarray:
    """gguf.quants.dequantize, with Q4_1 and Q8_0 (SmolLM2's linears and embedding) done here over
    the whole tensor at once: the same operations per value, so the same bits (tests/test_weights.py),
    without gguf's split of every tensor into row groups and blocks in Python. On the development
    CPU, SmolLM2's load_gguf, one process, four alternating rounds: 1.01-1.49 -> 0.74-0.83 s.
    data: the tensor's raw bytes, (rows, bytes a row) uint8; returns (rows, values a row) float32."""
    t = gguf.GGMLQuantizationType
    if qtype not in (t.Q4_1, t.Q8_0):
        return gguf.quants.dequantize(data, qtype)
    nbytes = 20 if qtype == t.Q4_1 else 34             # fp16 d (and m), then 32 codes a block
    if data.dtype != np.uint8 or data.ndim < 1:
        raise ValueError(f"{qtype.name} dequantization takes the raw bytes (uint8 rows), not {data.dtype} "
                         f"of {data.ndim} dimensions")
    if data.shape[-1] % nbytes:
        raise ValueError(f"{qtype.name} rows of {data.shape[-1]} bytes are not whole blocks")
    b = data.reshape(-1, nbytes)                                           # (blocks, bytes)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)              # (blocks, 1)
    out = np.empty((b.shape[0], 32), np.float32)                           # (blocks, 32)
    if qtype == t.Q8_0:
        out[...] = b[:, 2:].view(np.int8)                                   # x, then x·d
        out *= d
    else:
        m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        np.bitwise_and(b[:, 4:], 0x0F, out=out[:, :16], casting="unsafe")  # low nibbles: values 0..15
        np.right_shift(b[:, 4:], 4, out=out[:, 16:], casting="unsafe")     # high nibbles: values 16..31
        out *= d                                                            # d·q + m, gguf's order
        out += m
    return out.reshape(data.shape[:-1] + (data.shape[-1] // nbytes * 32,))


def _f32_value(v: Any) -> float:
    """A GGUF float32 as the shortest decimal that rounds to it (1e-05, not 9.99999974e-06),
    so configs match the HF config.json the file was converted from."""
    return float(str(np.float32(v)))


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _gguf_config(f: dict, path: Path, arch: str, by_name: dict) -> ModelConfig:
    """The HF config.json the file was converted from, rebuilt from `{arch}.*` keys and read by
    ModelConfig.from_hf (so a family's rules live in one place)."""
    def key(k, default=WeightsError, kind=int):
        return (_gguf_int if kind is int else _gguf_float)(f, path, f"{arch}.{k}", default)

    hidden = key("embedding_length")
    n_head = key("attention.head_count")
    if n_head <= 0:
        raise WeightsError(f"{path}: {arch}.attention.head_count must be positive, got {n_head}")
    head_dim = key("attention.key_length", hidden // n_head)
    rope_dim = key("rope.dimension_count", None)
    if rope_dim is not None and rope_dim != head_dim:
        raise WeightsError(f"{path}: partial RoPE (rope.dimension_count {rope_dim} < head_dim "
                           f"{head_dim}) is not supported")
    for moe in ("expert_count", "expert_used_count"):
        if key(moe, 0):
            raise WeightsError(f"{path}: mixture-of-experts models ({arch}.{moe} = {key(moe, 0)}) are not supported")
    # The embedding's rows are the model's vocabulary (HF's vocab_size); the token list
    # normally has the same length, since convert_hf_to_gguf pads it.
    if "token_embd.weight" in by_name:
        shape = by_name["token_embd.weight"].shape
        if len(shape) != 2:
            raise WeightsError(f"{path}: token_embd.weight must be 2-D, got shape {tuple(int(d) for d in shape)}")
        vocab = int(shape[-1])                                # GGUF shapes are (K, N): N is last
    elif "tokenizer.ggml.tokens" in f:
        toks = _gguf_kv(f, path, "tokenizer.ggml.tokens")
        vocab = len(toks) if isinstance(toks, list) else 0
    else:
        vocab = key("vocab_size")
    layers = key("block_count")
    mtype = GGUF_ARCHS[arch]
    d = dict(model_type=mtype, vocab_size=vocab, hidden_size=hidden,
             intermediate_size=key("feed_forward_length"), num_hidden_layers=layers,
             num_attention_heads=n_head, num_key_value_heads=key("attention.head_count_kv", n_head),
             head_dim=head_dim, rope_theta=key("rope.freq_base", 10000.0, float),
             rms_norm_eps=key("attention.layer_norm_rms_epsilon", 1e-5 if arch == "llama" else 1e-6, float),
             max_position_embeddings=key("context_length", 2048),
             tie_word_embeddings="output.weight" not in by_name,
             bos_token_id=_gguf_int(f, path, "tokenizer.ggml.bos_token_id", None),
             eos_token_id=_gguf_int(f, path, "tokenizer.ggml.eos_token_id", None))
    if arch in ("llama", "qwen3"):
        d["attention_bias"] = "blk.0.attn_q.bias" in by_name
    if arch == "llama":
        d["mlp_bias"] = "blk.0.ffn_up.bias" in by_name
    if arch == "gemma3":
        # llama.cpp: every 6th layer global, local base 10000, 1/√head_dim except the 27B (62 layers)
        d.update(sliding_window=key("attention.sliding_window", 4096),
                 sliding_window_pattern=key("attention.sliding_window_pattern", 6),
                 rope_local_base_freq=key("rope.freq_base_swa", 10000.0, float),
                 query_pre_attn_scalar=hidden // n_head if layers == 62 else head_dim,
                 hidden_activation="gelu_pytorch_tanh")
    scaling = _gguf_kv(f, path, f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        d["rope_scaling"] = {"rope_type": "linear", "factor": key("rope.scaling.factor", kind=float)}
    elif scaling not in ("none", ""):
        raise WeightsError(f"{path}: RoPE scaling {scaling!r} is not supported (only linear and llama3)")
    if "rope_freqs.weight" in by_name:
        d["rope_scaling"] = _llama3_from_rope_freqs(path, by_name["rope_freqs.weight"], head_dim,
                                                    d["rope_theta"])
    try:
        return ModelConfig.from_hf(d)
    except ConfigError as e:
        raise WeightsError(f"{path}: {e}") from None


# Llama 3.1 / 3.2 / 3.3 all use low 1, high 4 over an original context of 8192; the factor varies
# (8; 32 for 3.2). llama.cpp stores only the resulting divisors: we try these rules (the factor
# is the largest divisor) and keep the one that gives the stored divisors back.
_LLAMA3_CANDIDATES = [(lo, hi, 1 << e) for lo in (1.0, 2.0) for hi in (4.0, 8.0) for e in range(4, 21)]


def _llama3_from_rope_freqs(path: Path, t, head_dim: int, theta: float) -> dict:
    """rope_freqs.weight (D/2 divisors of the frequencies, llama.cpp's Llama 3.1 conversion) as the
    llama3 rope_scaling that produces them; anything else is refused."""
    try:
        div = np.array(t.data, dtype=np.float32).reshape(-1).astype(np.float64)       # (D/2,)
    except Exception as e:
        raise WeightsError(f"{path}: tensor rope_freqs.weight is unreadable ({type(e).__name__})") from None
    if div.shape != (head_dim // 2,) or not np.isfinite(div).all() or (div <= 0).any():
        raise WeightsError(f"{path}: rope_freqs.weight must hold {head_dim // 2} positive divisors")
    base = rope_inv_freq(head_dim, theta)
    factor = float(div.max())
    for lo, hi, orig in _LLAMA3_CANDIDATES:
        pred = base / rope_inv_freq(head_dim, theta, "llama3", factor, lo, hi, orig)
        if np.allclose(pred, div, rtol=1e-5, atol=0):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": lo, "high_freq_factor": hi,
                    "original_max_position_embeddings": orig}
    raise WeightsError(f"{path}: rope_freqs.weight holds RoPE frequency divisors that are not Llama 3's "
                       "llama3 scaling; this RoPE is not supported")
