"""The q.safetensors file: a quantized model, its config, tokenizer and recipe in one file.

docs/FORMAT.md is the specification; this module is its only reader and writer.

  tensors   float16 (or float32): model.embed_tokens.weight, lm_head.weight (untied only);
            float32: model.norm.weight,
            model.layers.{i}.input_layernorm.weight, model.layers.{i}.post_attention_layernorm.weight
            (Gemma 3: also pre_/post_feedforward_layernorm; Qwen3, Gemma 3: self_attn.q_norm/k_norm),
            every norm the multiplier itself (Gemma's 1 + w), and P.bias f32 (N,) for the linears
            in config.linear_bias (Qwen2: q, k, v)
            per linear, under its HF prefix P (e.g. model.layers.0.self_attn.q_proj), the tensors
            its kind's module defines (engine/formats/<kind>.py `tensors`):
              kind "dg":    P.qweight u8 (N, K/2), P.qzeros u8 (N, G), P.gscale u8 (N, G), P.cscale f32 (N,)
              kind "g":     P.qweight u8 (N, K/2), P.qzeros u8 (N, G), P.wscale f32 (N, G)
              kind "i8":    P.qweight i8 (N, K),   P.cscale f32 (N,)
              kind "float": P.weight f32 (N, K)    (a linear left unquantized)
              act "static" adds P.ascale f32 ()    (a 0-d tensor)
  metadata  format = "dgq-safetensors", version = "1", config (HF config.json as JSON),
            tokenizer (tokenizer.json text), chat_template (absent when the model has none),
            recipe (JSON object), linears (JSON: {P: {"kind", "act", "group"}}).

Every check failure on load is one QFileError naming the file. QFileWriter writes a file
layer by layer (the converter streams into it); save_qfile writes a whole ModelWeights with it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .. import formats
from ..util.files import PathError, input_path
from .config import ConfigError, ModelConfig
from .layout import (HF_LINEAR, LINEAR_NAMES, LayerWeights, ModelError, ModelWeights, WeightsError, check_fits,
                     expected_shapes, layer_norm_names)
from .safetensors import SafetensorsWriter, read_safetensors, read_safetensors_header

FORMAT_NAME = "dgq-safetensors"
FORMAT_VERSION = 1
FLOAT_KIND = "float"    # a linear left unquantized: P.weight f32 (N, K)
REQUIRED_META = ("format", "version", "config", "tokenizer", "recipe", "linears")
# The embedding and the output head: float16 by default (half of a small model's file; the GPU
# engine holds them in fp16 anyway), float32 on request. Readers accept both.
EMBED_DTYPES = ("float16", "float32")
EMBED_NAMES = ("model.embed_tokens.weight", "lm_head.weight")
FP16_MAX = 65504.0


class QFileError(WeightsError):
    """A q.safetensors file that is missing, truncated, foreign, or breaks the format
    (a WeightsError, so every loader fails with one exception type)."""


@dataclass
class QCheckpoint:
    """What load_qfile returns: the assembled weights and everything needed to run them."""
    config: ModelConfig
    weights: ModelWeights                 # linears are QuantLinears (or float arrays)
    tokenizer: object                     # tokenizers.Tokenizer
    chat_template: str | None
    recipe: dict
    source: str
    tokenizer_json: str = ""
    linears: dict = field(default_factory=dict)

    @property
    def kv_scales(self) -> np.ndarray | None:
        """(L, 2, Hkv) float32 symmetric INT8 scales [k, v] per layer and KV head, or None."""
        return kv_scales_from_recipe(self.recipe, self.config)


def kv_scales_from_recipe(recipe: dict, config: ModelConfig) -> np.ndarray | None:
    kv = recipe.get("kv_cache") if isinstance(recipe, dict) else None
    if not kv:
        return None
    a = np.array([kv["k_scale"], kv["v_scale"]], dtype=np.float32).transpose(1, 0, 2)  # (L, 2, Hkv)
    return a


def _linear_prefixes(config: ModelConfig) -> dict:
    """HF prefix -> (layer, short name, (N, K)) for every linear of the model."""
    shapes = expected_shapes(config)
    out = {}
    for i in range(config.num_hidden_layers):
        for n in LINEAR_NAMES:
            p = f"model.layers.{i}.{HF_LINEAR[n]}"
            out[p] = (i, n, shapes[p + ".weight"])
    return out


def _float_names(config: ModelConfig) -> dict:
    return {k: v for k, v in expected_shapes(config).items() if len(v) == 1 or "embed" in k or "lm_head" in k}


def _tokenizer_text(tokenizer) -> str:
    if isinstance(tokenizer, str):
        return tokenizer
    if hasattr(tokenizer, "to_str"):
        return tokenizer.to_str()
    raise QFileError(f"tokenizer must be tokenizer.json text or a tokenizers.Tokenizer, got {type(tokenizer)}")


# ----------------------------------------------------------------------------- write

class QFileWriter:
    """A q.safetensors file written in pieces, so a converter never holds the whole model:

        w = QFileWriter(path, config)            # embed_dtype "float16" (default) or "float32"
        w.add_floats(embed, norm, lm_head)       # first (lm_head None when tied)
        w.add_layer(i, layer)                    # i = 0, 1, ... in order; then drop the layer
        size = w.finish(tokenizer, chat_template, recipe)

    Tensors go out in save_qfile's order, so the file equals save_qfile's byte for byte. The
    file appears atomically at finish(); abort() (or an exception inside `with`) leaves nothing.
    """

    def __init__(self, path, config: ModelConfig, embed_dtype: str = "float16"):
        if embed_dtype not in EMBED_DTYPES:
            raise QFileError(f"{path}: embed_dtype must be one of {', '.join(EMBED_DTYPES)}, got {embed_dtype!r}")
        self.path, self.config, self.embed_dtype = Path(path), config, embed_dtype
        self._w = SafetensorsWriter(path)
        self._prefixes = _linear_prefixes(config)
        self.linears: dict = {}
        self.float_dtypes: dict = {}
        self.next_layer = None

    def add_floats(self, embed, norm, lm_head=None) -> None:
        if self.next_layer is not None:
            raise QFileError(f"{self.path}: add_floats() comes before the layers")
        self._float("model.embed_tokens.weight", embed)
        self._w.add("model.norm.weight", np.asarray(norm, dtype=np.float32))
        if not self.config.tie_word_embeddings:
            if lm_head is None:
                raise QFileError(f"{self.path}: an untied model needs lm_head")
            self._float("lm_head.weight", lm_head)
        self.next_layer = 0

    def _float(self, name: str, a) -> None:
        a = np.asarray(a, dtype=np.float32)
        dt = self.embed_dtype
        if dt == "float16" and a.size and float(np.abs(a).max()) > FP16_MAX:
            dt = "float32"                       # values fp16 cannot hold: keep this one exact
        self.float_dtypes[name] = dt
        self._w.add(name, a.astype(dt, copy=False))

    def add_layer(self, i: int, L) -> None:
        if self.next_layer is None or i != self.next_layer:
            raise QFileError(f"{self.path}: layer {i} out of order (expected {self.next_layer}; "
                             "add_floats() first)")
        try:
            L.check(self.config, i)
        except ModelError as e:
            raise QFileError(f"{self.path}: {e}") from None
        for role, hf in layer_norm_names(self.config).items():      # norms first, then the linears
            self._w.add(f"model.layers.{i}.{hf}.weight", np.asarray(getattr(L, role), dtype=np.float32))
        for n in LINEAR_NAMES:
            p = f"model.layers.{i}.{HF_LINEAR[n]}"
            shape = self._prefixes[p][2]
            w = getattr(L, n)
            if isinstance(w, formats.QuantLinear):
                formats.validate(w)
                if w.shape != shape:
                    raise QFileError(f"{self.path}: {p} has shape {w.shape}, the config wants {shape}")
                self.linears[p] = {"kind": w.kind, "act": w.act, "group": int(w.group)}
                for t, a in w.tensors().items():
                    self._w.add(f"{p}.{t}", a)
                if w.act == "static":
                    self._w.add(f"{p}.ascale", np.array(w.ascale, dtype=np.float32))     # 0-d
            else:
                self.linears[p] = {"kind": FLOAT_KIND, "act": "none", "group": 0}
                self._w.add(f"{p}.weight", np.asarray(w, dtype=np.float32))
            if n in L.bias:                                            # float32, added after the epilogue
                self._w.add(f"{p}.bias", np.asarray(L.bias[n], dtype=np.float32))
        self.next_layer = i + 1

    def finish(self, tokenizer_json, chat_template: str | None, recipe: dict) -> int:
        """Write the metadata and move the file into place; return its size in bytes."""
        if self.next_layer != self.config.num_hidden_layers:
            raise QFileError(f"{self.path}: {self.next_layer} of {self.config.num_hidden_layers} layers written")
        try:
            recipe_text = json.dumps(recipe, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise QFileError(f"{self.path}: the recipe is not JSON-serialisable: {e}") from None
        meta = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION),
                "config": json.dumps(self.config.to_hf()), "tokenizer": _tokenizer_text(tokenizer_json),
                "recipe": recipe_text, "linears": json.dumps(self.linears)}
        if chat_template is not None:
            meta["chat_template"] = chat_template
        return self._w.finish(meta)

    def abort(self) -> None:
        self._w.abort()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.abort()
        return False


def save_qfile(path, weights, config: ModelConfig, tokenizer_json, chat_template: str | None,
               recipe: dict, embed_dtype: str = "float16") -> int:
    """Write a quantized model atomically (temp file + os.replace); return the file size in bytes.

    weights: ModelWeights whose linears are QuantLinears (or float arrays);
    tokenizer_json: the tokenizer.json text or a tokenizers.Tokenizer;
    embed_dtype: how the embedding and lm_head are stored, "float16" or "float32".
    """
    path = Path(path)
    if weights.config != config:
        raise QFileError(f"{path}: the weights were built for a different config")
    with QFileWriter(path, config, embed_dtype) as w:
        w.add_floats(weights.embed, weights.norm, weights.lm_head)
        for i, L in enumerate(weights.layers):
            w.add_layer(i, L)
        return w.finish(tokenizer_json, chat_template, recipe)


# ----------------------------------------------------------------------------- read

def _fail(path, msg: str):
    raise QFileError(f"{path}: {msg}")


def _json(path, meta: dict, key: str):
    try:
        return json.loads(meta[key])
    except (json.JSONDecodeError, RecursionError) as e:
        _fail(path, f"metadata {key!r} is not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})")


def load_qfile(path) -> QCheckpoint:
    """Read and check a q.safetensors file; return a QCheckpoint with ModelWeights ready to run."""
    try:
        path = input_path(path, "a q.safetensors file")
    except PathError as e:
        raise QFileError(str(e)) from None
    try:
        header, meta, _ = read_safetensors_header(path)
    except WeightsError as e:
        raise QFileError(str(e)) from None
    if meta.get("format") != FORMAT_NAME:
        _fail(path, f"not a {FORMAT_NAME} file (metadata format = {meta.get('format')!r})")
    if meta.get("version") != str(FORMAT_VERSION):
        _fail(path, f"{FORMAT_NAME} version {meta.get('version')!r} is not supported "
                    f"(this engine reads version {FORMAT_VERSION})")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        _fail(path, f"metadata key(s) missing: {', '.join(missing)}")
    try:
        cfg = _json(path, meta, "config")
        if not isinstance(cfg, dict):
            _fail(path, "metadata 'config' is not a JSON object")
        config = ModelConfig.from_hf(cfg)
    except ConfigError as e:
        _fail(path, f"bad config: {e}")
    try:   # against what the file holds, before anything is sized from the config
        check_fits(config, path, len(header), path.stat().st_size, min_bits=2)
    except WeightsError as e:
        raise QFileError(str(e)) from None
    recipe = _json(path, meta, "recipe")
    linears = _json(path, meta, "linears")
    if not isinstance(recipe, dict) or not isinstance(linears, dict):
        _fail(path, "metadata 'recipe' and 'linears' must be JSON objects")
    try:
        tokenizer = Tokenizer.from_str(meta["tokenizer"])
    except Exception as e:  # the tokenizers library raises its own exception type
        _fail(path, f"metadata 'tokenizer' is not a valid tokenizer.json ({e})")

    # Names: exactly the expected set, nothing missing, nothing extra.
    prefixes = _linear_prefixes(config)
    if set(linears) != set(prefixes):
        extra = sorted(set(linears) - set(prefixes))[:3]
        lack = sorted(set(prefixes) - set(linears))[:3]
        _fail(path, f"metadata 'linears' does not match the config (missing {lack}, unexpected {extra})")
    expect = {n: (np.float32, s) for n, s in _float_names(config).items()}
    for p, (_, _, (n_out, k_in)) in prefixes.items():
        spec = linears[p]
        if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str) \
                or spec.get("kind") not in formats.KINDS and spec.get("kind") != FLOAT_KIND:
            _fail(path, f"{p}: unknown linear kind in metadata: {spec!r}")
        kind, act, group = spec["kind"], spec.get("act"), spec.get("group")
        if kind == FLOAT_KIND:
            expect[f"{p}.weight"] = (np.float32, (n_out, k_in))
            continue
        if not isinstance(group, int) or isinstance(group, bool) or not 1 <= group <= 1 << 20:
            _fail(path, f"{p}: bad group size {group!r}")
        if act not in formats.ACT_MODES:
            _fail(path, f"{p}: unknown activation mode {act!r}; expected one of {formats.ACT_MODES}")
        try:
            layout = formats.kind_tensors(kind, n_out, k_in, group)     # the kind's layout, defined once
        except formats.FormatError as e:
            _fail(path, f"{p}: {e}")
        for t, spec_t in layout.items():
            expect[f"{p}.{t}"] = spec_t
        if act == "static":
            expect[f"{p}.ascale"] = (np.float32, ())
    lack = sorted(set(expect) - set(header))
    if lack:
        _fail(path, f"tensor(s) missing: {', '.join(lack[:5])}{' ...' if len(lack) > 5 else ''}")
    extra = sorted(set(header) - set(expect))
    if extra:
        _fail(path, f"unexpected tensor(s): {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    try:
        tensors, _ = read_safetensors(path)
    except WeightsError as e:
        raise QFileError(str(e)) from None
    for name, (dt, shape) in expect.items():
        a = tensors[name]
        if name in EMBED_NAMES and a.dtype == np.float16:
            a = tensors[name] = a.astype(np.float32)                # fp16 on disk, float32 in memory
        if a.dtype != np.dtype(dt):
            _fail(path, f"tensor {name} has dtype {a.dtype}, expected "
                        f"{'float16 or float32' if name in EMBED_NAMES else np.dtype(dt)}")
        if a.shape != tuple(shape):
            _fail(path, f"tensor {name} has shape {a.shape}, expected {tuple(shape)}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            _fail(path, f"tensor {name} holds NaN or Inf values")
        if name.endswith(".ascale") and not 0 < float(a) * formats.QMAX_I8 <= formats.FP16_MAX:
            _fail(path, f"tensor {name} = {float(a):.3g} is not a usable activation scale "
                        f"(positive, at most {formats.FP16_MAX / formats.QMAX_I8:.0f})")

    def linear(p):
        spec = linears[p]
        if spec["kind"] == FLOAT_KIND:
            return tensors[f"{p}.weight"]
        n_out, k_in = prefixes[p][2]
        try:
            ql = formats.QuantLinear(
                kind=spec["kind"], act=spec.get("act"), in_features=k_in, out_features=n_out,
                group=spec["group"], ascale=float(tensors[f"{p}.ascale"]) if f"{p}.ascale" in tensors else None,
                **{t: tensors[f"{p}.{t}"] for t in formats.kind_tensors(spec["kind"], n_out, k_in, spec["group"])})
            if ql.kind == "dg":
                formats.check_no_overflow(ql)   # docs/FORMAT.md's invariant, for every device
            return ql
        except formats.FormatError as e:
            _fail(path, f"{p}: {e}")

    layers = []
    for i in range(config.num_hidden_layers):
        lin = {n: linear(p) for p, (li, n, _) in prefixes.items() if li == i}
        norms = {role: tensors[f"model.layers.{i}.{hf}.weight"] for role, hf in layer_norm_names(config).items()}
        bias = {n: tensors[f"model.layers.{i}.{HF_LINEAR[n]}.bias"] for n in config.linear_bias}
        layers.append(LayerWeights(**norms, **lin, bias=bias))
    embed = tensors["model.embed_tokens.weight"]
    weights = ModelWeights(config=config, embed=embed, layers=layers, norm=tensors["model.norm.weight"],
                           lm_head=embed if config.tie_word_embeddings else tensors["lm_head.weight"])
    ck = QCheckpoint(config=config, weights=weights, tokenizer=tokenizer,
                     chat_template=meta.get("chat_template"), recipe=recipe, source=str(path),
                     tokenizer_json=meta["tokenizer"], linears=linears)
    try:
        kv = ck.kv_scales
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        _fail(path, f"recipe 'kv_cache' is malformed ({e})")
    if kv is not None and (kv.shape != (config.num_hidden_layers, 2, config.num_key_value_heads)
                           or not np.isfinite(kv).all() or (kv <= 0).any()):
        _fail(path, f"recipe 'kv_cache' scales must be positive with shape "
                    f"(layers {config.num_hidden_layers}, KV heads {config.num_key_value_heads})")
    return ck
