"""Generators of damaged inputs for tests/test_fuzz_inputs.py: tiny valid files, and corruptions
of them that every loader and command must refuse with one clear line.

Every generated case is invalid by construction (a truncation always cuts the last tensor; a
lie about a dtype swaps to one the file may not hold; ...), so "it loaded" is a failure, never
luck. Each case is a `Case(name, build)`: build(workdir, base) writes what the case needs into
its own working directory and returns the invocation: ("run" | "eval" | "quantize" | "export",
argv) for a dgq-* command, or ("api", path) for engine.api.load_model.

Families (counts in the test's report): truncations, header-length lies, per-tensor
dtype/shape/offset lies, overlapping byte ranges, header JSON mutations, q.safetensors metadata
tampering and out-of-format values, HF directory files (config, index, tokenizer, NaN weights,
FIFOs, symlink loops), GGUF truncations, header fields and metadata (through the gguf package's
own writer), random bytes, text files, and bad command-line flags.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from tiny_model import make_tiny_checkpoint, write_tiny_gguf

RUN = ["--prompt", "hi", "--raw", "--max-new-tokens", "1", "--device", "cpu"]


@dataclass
class Case:
    name: str
    build: Callable      # (workdir: Path, base: Base) -> (command, argv or path)


@dataclass
class Base:
    """Valid tiny inputs, written once; cases copy what they damage."""
    root: Path
    hf: Path             # HF dir, one float32 model.safetensors
    hf_sharded: Path     # HF dir, two shards + index
    gguf: Path
    q_dg: Path           # dgq-rtn: kind dg, static + dynamic activations
    q_g: Path            # w4a16: kind g, float activations
    q_i8: Path           # w8a8: kind i8, static activations
    text: Path


def make_base(root: Path) -> Base:
    from converters.quantize import quantize_checkpoint
    from engine.io.hf_dir import load_hf_dir
    from engine.io.qfile import save_qfile

    root.mkdir(parents=True, exist_ok=True)
    hf, hfs = root / "hf", root / "hf_sharded"
    make_tiny_checkpoint(hf)
    make_tiny_checkpoint(hfs, shards=2)
    ck = load_hf_dir(hf)
    g = root / "tiny.gguf"
    write_tiny_gguf(g, ck)
    seqs = np.random.default_rng(1).integers(0, ck.config.vocab_size, (2, 16)).astype(np.int32)
    qs = {}
    for method in ("dgq-rtn", "w4a16", "w8a8"):
        w, recipe = quantize_checkpoint(ck, method, group=16, calib=seqs, progress=False)
        qs[method] = root / f"{method}.q.safetensors"
        save_qfile(qs[method], w, ck.config, ck.tokenizer, ck.chat_template, recipe)
    text = root / "t.txt"
    text.write_text("the other one is at the center of the river. " * 20)
    return Base(root, hf, hfs, g, qs["dgq-rtn"], qs["w4a16"], qs["w8a8"], text)


# ----------------------------------------------------------------------------- safetensors surgery

def st_parse(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def st_build(header, data: bytes, pad: bool = True) -> bytes:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + data


def tensor_names(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def pick(header: dict, want: str) -> str:
    """A tensor of the header: 'float' (a 2-D float), 'norm' (a 1-D float), 'u8', 'last' (the
    tensor whose bytes end the file)."""
    names = tensor_names(header)
    if want == "last":
        return max(names, key=lambda n: header[n]["data_offsets"][1])
    for n in names:
        e = header[n]
        if want == "float" and e["dtype"] in ("F32", "F16", "BF16") and len(e["shape"]) == 2:
            return n
        if want == "norm" and e["dtype"] in ("F32", "F16", "BF16") and len(e["shape"]) == 1 and "norm" in n:
            return n
        if want == "u8" and e["dtype"] in ("U8", "I8"):
            return n
    return names[0]


def copy_target(kind: str, work: Path, base: Base) -> tuple[Path, Path, str]:
    """(file to damage, what to pass as --weights, its description) for a safetensors target."""
    if kind == "hf":
        d = work / "m"
        shutil.copytree(base.hf, d)
        return d / "model.safetensors", d, "hf"
    if kind == "shard":
        d = work / "m"
        shutil.copytree(base.hf_sharded, d)
        return d / "model-00002-of-00002.safetensors", d, "shard"
    src = {"q_dg": base.q_dg, "q_g": base.q_g, "q_i8": base.q_i8}[kind]
    f = work / "m.q.safetensors"
    shutil.copyfile(src, f)
    return f, f, kind


ST_TARGETS = ("hf", "shard", "q_dg")


_VIA = itertools.cycle(("run", "quantize", "run", "export"))


def _run(weights, api: bool = False):
    """The invocation for a damaged weights file: load_model, or in turn dgq-run, dgq-quantize
    and dgq-export (each must refuse it before writing anything)."""
    if api:
        return ("api", str(weights))
    via = next(_VIA)
    out = Path(weights).parent / ("o.q.safetensors" if via == "quantize" else "x")
    if via == "quantize":
        return ("quantize", [str(weights), "--out", str(out), "--method", "w4a16", "--quiet"])
    if via == "export":
        return ("export", [str(weights), "--out", str(out)])
    return ("run", ["--weights", str(weights)] + RUN)


def st_truncations() -> list[Case]:
    cases = []
    for t in ST_TARGETS:
        for i, where in enumerate(["0", "1", "4", "7", "8", "9", "hdr_mid", "hdr_end-1", "hdr_end",
                                   "hdr_end+1", "half", "size-1"]):
            def build(work, base, t=t, where=where, i=i):
                f, w, _ = copy_target(t, work, base)
                raw = f.read_bytes()
                (n,) = struct.unpack("<Q", raw[:8])
                at = {"hdr_mid": 8 + n // 2, "hdr_end-1": 8 + n - 1, "hdr_end": 8 + n,
                      "hdr_end+1": 8 + n + 1, "half": len(raw) // 2, "size-1": len(raw) - 1}.get(where)
                f.write_bytes(raw[:int(where) if at is None else at])
                return _run(w, api=i % 3 == 0)
            cases.append(Case(f"st-truncate-{t}-{where}", build))
    return cases


def st_length_lies() -> list[Case]:
    cases = []
    for t in ST_TARGETS:
        for lie in ("0", "1", "2", "7", "size-7", "size", "2^32", "2^63", "2^64-1"):
            def build(work, base, t=t, lie=lie):
                f, w, _ = copy_target(t, work, base)
                raw = f.read_bytes()
                v = {"size-7": len(raw) - 7, "size": len(raw), "2^32": 2**32, "2^63": 2**63,
                     "2^64-1": 2**64 - 1}.get(lie)
                f.write_bytes(struct.pack("<Q", int(lie) if v is None else v) + raw[8:])
                return _run(w, api=lie == "0")
            cases.append(Case(f"st-hdrlen-{t}-{lie}", build))
    return cases


_SAME_SIZE_OTHER_KIND = {"F32": "I32", "F16": "I16", "BF16": "I16", "U8": "I8", "I8": "U8", "U32": "I32"}


def _entry_lies():
    def dt_swap(e, h): e["dtype"] = _SAME_SIZE_OTHER_KIND[e["dtype"]]
    def dt_wider(e, h): e["dtype"] = "F64"
    def dt_unknown(e, h): e["dtype"] = "Q4_K"
    def dt_int(e, h): e["dtype"] = 5
    def dt_missing(e, h): del e["dtype"]
    def shape_neg(e, h): e["shape"] = [-e["shape"][0]] + e["shape"][1:]
    def shape_huge(e, h): e["shape"] = [2**40, 2**40]
    def shape_overflow(e, h): e["shape"] = [2**62, 2**62, 16]
    def shape_extra(e, h): e["shape"] = e["shape"] + [1] if len(e["shape"]) == 1 else [e["shape"][0] * e["shape"][1]]
    def shape_empty(e, h): e["shape"] = []
    def shape_str(e, h): e["shape"] = "12"
    def shape_float(e, h): e["shape"] = [float(d) + 0.5 for d in e["shape"]]
    def shape_zero_huge(e, h):        # no byte, so the sizes agree; NumPy cannot hold the shape
        e["shape"], e["data_offsets"] = [0, 2**64], [e["data_offsets"][0]] * 2
    def shape_zero_ndim65(e, h): e["shape"], e["data_offsets"] = [1] * 64 + [0], [e["data_offsets"][0]] * 2
    def off_plus1(e, h): e["data_offsets"] = [e["data_offsets"][0], e["data_offsets"][1] + 1]
    def off_reversed(e, h): e["data_offsets"] = e["data_offsets"][::-1]
    def off_negative(e, h): e["data_offsets"] = [-8, e["data_offsets"][1] - e["data_offsets"][0] - 8]
    def off_huge(e, h):
        n = e["data_offsets"][1] - e["data_offsets"][0]
        e["data_offsets"] = [2**62, 2**62 + n]
    def off_one(e, h): e["data_offsets"] = [e["data_offsets"][0]]
    def off_missing(e, h): del e["data_offsets"]
    def entry_list(e, h): h[next(k for k, v in h.items() if v is e)] = [1, 2, 3]
    return {k: v for k, v in locals().items()}


def st_entry_lies() -> list[Case]:
    cases = []
    lies = _entry_lies()
    for t in ST_TARGETS:
        for which in (("float", "u8") if t.startswith("q") else ("float", "norm")):
            for lname, fn in lies.items():
                def build(work, base, t=t, which=which, fn=fn):
                    f, w, _ = copy_target(t, work, base)
                    h, data = st_parse(f)
                    name = pick(h, which)
                    fn(h[name], h)
                    f.write_bytes(st_build(h, data))
                    return _run(w)
                cases.append(Case(f"st-entry-{t}-{which}-{lname}", build))
    return cases


def st_overlaps() -> list[Case]:
    """Two tensors sharing bytes: the same range twice, or a range shifted into a neighbour's.
    Everything else about the file stays valid, so only the overlap check can refuse it."""
    cases = []
    for t in ST_TARGETS + ("q_g",):
        for mode in ("same", "shifted"):
            def build(work, base, t=t, mode=mode):
                f, w, _ = copy_target(t, work, base)
                h, data = st_parse(f)
                by_size = {}
                for n in tensor_names(h):
                    b, e = h[n]["data_offsets"]
                    by_size.setdefault((e - b, h[n]["dtype"]), []).append(n)
                a, b_ = next(v for v in by_size.values() if len(v) >= 2)[:2]
                ra, rb = h[a]["data_offsets"], h[b_]["data_offsets"]
                if mode == "same":
                    h[b_]["data_offsets"] = list(ra)
                else:       # start inside a's range: the bytes after it shift in
                    step = 4
                    start = ra[0] + step if ra[0] + step + (rb[1] - rb[0]) <= len(data) else ra[0] - step
                    h[b_]["data_offsets"] = [start, start + rb[1] - rb[0]]
                f.write_bytes(st_build(h, data))
                return _run(w, api=mode == "same")
            cases.append(Case(f"st-overlap-{t}-{mode}", build))
    return cases


def st_json_mutations() -> list[Case]:
    def not_json(h): return b"{\"a\": nope" + b" " * 8
    def a_list(h): return b"[1, 2, 3]"
    def a_number(h): return b"42"
    def meta_list(h):
        h["__metadata__"] = ["format", "pt"]
        return h
    def meta_int(h):
        h["__metadata__"] = {"format": 7}
        return h
    def deep(h): return b"[" * 200000 + b"]" * 200000
    def bad_utf8(h): return b"{\"\xff\xfe\": 1}"
    def renamed(h):
        n = pick(h, "norm")
        h[n.replace("norm", "nrom")] = h.pop(n)
        return h
    def dropped(h):
        h.pop(pick(h, "float"))
        return h
    muts = {k: v for k, v in locals().items()}
    cases = []
    for t in ST_TARGETS:
        for mname, fn in muts.items():
            def build(work, base, t=t, fn=fn):
                f, w, _ = copy_target(t, work, base)
                h, data = st_parse(f)
                f.write_bytes(st_build(fn(h), data))
                return _run(w)
            cases.append(Case(f"st-json-{t}-{mname}", build))
    return cases


# ----------------------------------------------------------------------------- q.safetensors

def _meta_edit(key, value=None, *, drop=False, fn=None):
    def edit(meta):
        if drop:
            meta.pop(key, None)
        elif fn is not None:
            meta[key] = fn(meta[key])
        else:
            meta[key] = value
    return edit


def _json_edit(fn):
    def edit(text):
        d = json.loads(text)
        fn(d)
        return json.dumps(d)
    return edit


def _cfg(**kv):
    return _json_edit(lambda d: d.update(kv))


def _first_linear(d):
    return sorted(d)[0]


def q_metadata_cases() -> list[Case]:
    edits = {
        "format-foreign": _meta_edit("format", "pt"),
        "version-2": _meta_edit("version", "2"),
        "version-0": _meta_edit("version", "0"),
        "config-missing": _meta_edit("config", drop=True),
        "tokenizer-missing": _meta_edit("tokenizer", drop=True),
        "recipe-missing": _meta_edit("recipe", drop=True),
        "linears-missing": _meta_edit("linears", drop=True),
        "format-missing": _meta_edit("format", drop=True),
        "config-not-json": _meta_edit("config", "{nope"),
        "config-list": _meta_edit("config", "[1, 2]"),
        "config-layers-1e9": _meta_edit("config", fn=_cfg(num_hidden_layers=10**9)),
        "config-layers-1000": _meta_edit("config", fn=_cfg(num_hidden_layers=1000)),
        "config-layers-3": _meta_edit("config", fn=_cfg(num_hidden_layers=3)),
        "config-context-1e13": _meta_edit("config", fn=_cfg(max_position_embeddings=10**13)),
        "config-context-inf": _meta_edit("config", fn=lambda s: s.replace(
            '"max_position_embeddings": 128', '"max_position_embeddings": 1e999')),
        "config-vocab-0": _meta_edit("config", fn=_cfg(vocab_size=0)),
        "config-hidden-neg": _meta_edit("config", fn=_cfg(hidden_size=-32)),
        "config-hidden-huge": _meta_edit("config", fn=_cfg(hidden_size=2**30)),
        "config-rope-str": _meta_edit("config", fn=_cfg(rope_theta="x")),
        "config-rope-nan": _meta_edit("config", fn=lambda s: s.replace('"rope_theta": 10000.0', '"rope_theta": NaN')),
        "config-heads-3": _meta_edit("config", fn=_cfg(num_attention_heads=3)),
        "config-tie-flip": _meta_edit("config", fn=_cfg(tie_word_embeddings=True)),
        "config-eos-str": _meta_edit("config", fn=_cfg(eos_token_id="x")),
        "linears-not-json": _meta_edit("linears", "nope"),
        "linears-drop-one": _meta_edit("linears", fn=_json_edit(lambda d: d.pop(_first_linear(d)))),
        "linears-kind-unknown": _meta_edit("linears", fn=_json_edit(
            lambda d: d[_first_linear(d)].update(kind="q9"))),
        "linears-kind-list": _meta_edit("linears", fn=_json_edit(
            lambda d: d[_first_linear(d)].update(kind=["dg"]))),
        "linears-group-0": _meta_edit("linears", fn=_json_edit(
            lambda d: d[_first_linear(d)].update(group=0))),
        "linears-group-str": _meta_edit("linears", fn=_json_edit(
            lambda d: d[_first_linear(d)].update(group="16"))),
        "linears-group-other": _meta_edit("linears", fn=_json_edit(
            lambda d: d[_first_linear(d)].update(group=8))),
        "linears-act-bogus": _meta_edit("linears", fn=_json_edit(
            lambda d: d[_first_linear(d)].update(act="fancy"))),
        "linears-extra": _meta_edit("linears", fn=_json_edit(
            lambda d: d.update({"model.layers.9.mlp.up_proj": {"kind": "dg", "act": "dynamic", "group": 16}}))),
        "linears-spec-list": _meta_edit("linears", fn=_json_edit(lambda d: d.update({_first_linear(d): [1]}))),
        "tokenizer-garbage": _meta_edit("tokenizer", "not a tokenizer"),
        "tokenizer-empty-object": _meta_edit("tokenizer", "{}"),
        "recipe-list": _meta_edit("recipe", "[]"),
        "kv-wrong-shape": _meta_edit("recipe", fn=_json_edit(
            lambda d: d.update(kv_cache={"bits": 8, "k_scale": [[1.0]], "v_scale": [[1.0]]}))),
        "kv-negative": _meta_edit("recipe", fn=_json_edit(
            lambda d: d.update(kv_cache={"bits": 8, "k_scale": [[-1.0, 1.0]] * 2, "v_scale": [[1.0, 1.0]] * 2}))),
        "kv-strings": _meta_edit("recipe", fn=_json_edit(
            lambda d: d.update(kv_cache={"bits": 8, "k_scale": "x", "v_scale": "y"}))),
        "kv-missing-part": _meta_edit("recipe", fn=_json_edit(
            lambda d: d.update(kv_cache={"bits": 8, "k_scale": [[1.0, 1.0]] * 2}))),
        "kv-int-1e400": _meta_edit("recipe", fn=_json_edit(
            lambda d: d.update(kv_cache={"bits": 8, "k_scale": [[10**400, 1]] * 2, "v_scale": [[1, 1]] * 2}))),
    }
    cases = []
    for t in ("q_dg", "q_g"):
        for ename, edit in edits.items():
            def build(work, base, t=t, edit=edit):
                f, w, _ = copy_target(t, work, base)
                h, data = st_parse(f)
                edit(h["__metadata__"])
                f.write_bytes(st_build(h, data))
                return _run(w, api=t == "q_g")
            cases.append(Case(f"q-meta-{t}-{ename}", build))
    return cases


def _tensor_edit(suffix: str, fn):
    """Rewrite, in place, the first tensor whose name ends with `suffix` (same bytes length)."""
    def edit(h, data: bytearray):
        from engine.io.safetensors import _ST_DTYPES
        name = next(n for n in sorted(tensor_names(h)) if n.endswith(suffix))
        e = h[name]
        b, end = e["data_offsets"]
        a = np.frombuffer(bytes(data[b:end]), dtype=_ST_DTYPES[e["dtype"]]).reshape(e["shape"]).copy()
        a = fn(a)
        data[b:end] = a.tobytes()
    return edit


def _set(v):
    def f(a):
        a[...] = v
        return a
    return f


def _first(v):
    def f(a):
        a.reshape(-1)[0] = v
        return a
    return f


def q_value_cases() -> list[Case]:
    overflow = ("q_dg", "self_attn.q_proj.gscale", _set(127))        # with codes far from zero
    edits = {
        "dg-overflow": overflow,
        "dg-gscale-0": ("q_dg", "self_attn.q_proj.gscale", _first(0)),
        "dg-gscale-200": ("q_dg", "self_attn.k_proj.gscale", _first(200)),
        "dg-qzeros-16": ("q_dg", "mlp.up_proj.qzeros", _first(16)),
        "dg-cscale-nan": ("q_dg", "self_attn.o_proj.cscale", _first(np.nan)),
        "dg-cscale-inf": ("q_dg", "self_attn.o_proj.cscale", _first(np.inf)),
        "dg-cscale-1e30": ("q_dg", "mlp.down_proj.cscale", _first(1e30)),
        "dg-ascale-0": ("q_dg", "self_attn.q_proj.ascale", _set(0.0)),
        "dg-ascale-neg": ("q_dg", "self_attn.q_proj.ascale", _set(-1.0)),
        "dg-ascale-nan": ("q_dg", "mlp.gate_proj.ascale", _set(np.nan)),
        "dg-ascale-1e10": ("q_dg", "mlp.gate_proj.ascale", _set(1e10)),
        "dg-embed-nan": ("q_dg", "embed_tokens.weight", _first(np.nan)),
        "dg-norm-inf": ("q_dg", "model.norm.weight", _first(np.inf)),
        "dg-lmhead-neginf": ("q_dg", "lm_head.weight", _first(-np.inf)),
        "g-wscale-nan": ("q_g", "self_attn.v_proj.wscale", _first(np.nan)),
        "g-wscale-1e30": ("q_g", "self_attn.v_proj.wscale", _first(1e30)),
        "g-qzeros-200": ("q_g", "mlp.up_proj.qzeros", _first(200)),
        "i8-minus-128": ("q_i8", "mlp.up_proj.qweight", _first(-128)),
        "i8-cscale-1e30": ("q_i8", "mlp.up_proj.cscale", _first(1e30)),
        "i8-ascale-inf": ("q_i8", "mlp.up_proj.ascale", _set(np.inf)),
    }
    cases = []
    for ename, (t, suffix, fn) in edits.items():
        def build(work, base, t=t, suffix=suffix, fn=fn, ename=ename):
            f, w, _ = copy_target(t, work, base)
            h, data = st_parse(f)
            data = bytearray(data)
            if ename == "dg-overflow":     # codes 15 against zero points 0 at S = 127: |q - z|·S = 1905
                _tensor_edit("self_attn.q_proj.qweight", _set(0xFF))(h, data)
                _tensor_edit("self_attn.q_proj.qzeros", _set(0))(h, data)
            _tensor_edit(suffix, fn)(h, data)
            f.write_bytes(st_build(h, bytes(data)))
            return _run(w, api=True) if "nan" in ename else _run(w)
        cases.append(Case(f"q-value-{ename}", build))
    return cases


# ----------------------------------------------------------------------------- HF directories

def json_edit(name: str, fn):
    """An edit of directory d: the JSON file d/name, changed in place by fn."""
    def edit(d: Path):
        p = d / name
        doc = json.loads(p.read_text())
        fn(doc)
        p.write_text(json.dumps(doc))
    return edit


def hf_cases() -> list[Case]:
    def cfg(fn):
        return json_edit("config.json", fn)

    def write(name, content):
        def edit(d: Path):
            p = d / name
            if isinstance(content, bytes):
                p.write_bytes(content)
            else:
                p.write_text(content)
        return edit

    def remove(name):
        return lambda d: (d / name).unlink()

    def fifo(name):
        def edit(d: Path):
            (d / name).unlink()
            os.mkfifo(d / name)
        return edit

    def loop(name):
        def edit(d: Path):
            (d / name).unlink()
            os.symlink(d / (name + ".b"), d / name)
            os.symlink(d / name, d / (name + ".b"))
        return edit

    def nan_weight(name, value, dtype="F32"):
        def edit(d: Path):
            f = d / "model.safetensors"
            h, data = st_parse(f)
            data = bytearray(data)
            _tensor_edit(name, _first(value))(h, data)
            f.write_bytes(st_build(h, bytes(data)))
        return edit

    def pop(key):
        return cfg(lambda c: c.pop(key))

    edits = {
        "config-missing": remove("config.json"),
        "config-empty": write("config.json", ""),
        "config-garbage": write("config.json", b"\x00\xff\xfe garbage"),
        "config-list": write("config.json", "[1, 2, 3]"),
        "config-deep": write("config.json", "[" * 100000 + "]" * 100000),
        "config-no-hidden": pop("hidden_size"),
        "config-no-layers": pop("num_hidden_layers"),
        "config-no-vocab": pop("vocab_size"),
        "config-layers-1e9": cfg(lambda c: c.update(num_hidden_layers=10**9)),
        "config-layers-1000": cfg(lambda c: c.update(num_hidden_layers=1000)),
        "config-layers-str": cfg(lambda c: c.update(num_hidden_layers="2")),
        "config-layers-float": cfg(lambda c: c.update(num_hidden_layers=2.5)),
        "config-layers-bool": cfg(lambda c: c.update(num_hidden_layers=True)),
        "config-context-1e13": cfg(lambda c: c.update(max_position_embeddings=10**13)),
        "config-context-0": cfg(lambda c: c.update(max_position_embeddings=0)),
        "config-vocab-huge": cfg(lambda c: c.update(vocab_size=10**7)),
        "config-hidden-64": cfg(lambda c: c.update(hidden_size=64)),
        "config-heads-bad": cfg(lambda c: c.update(num_key_value_heads=3)),
        "config-headdim-odd": cfg(lambda c: c.update(head_dim=7)),
        "config-model-type": cfg(lambda c: c.update(model_type="gpt2")),
        "config-eps-neg": cfg(lambda c: c.update(rms_norm_eps=-1.0)),
        "config-theta-0": cfg(lambda c: c.update(rope_theta=0)),
        "config-tie-str": cfg(lambda c: c.update(tie_word_embeddings="no")),
        "config-bos-2e70": cfg(lambda c: c.update(bos_token_id=2**70)),
        "config-eos-2e60": cfg(lambda c: c.update(eos_token_id=2**60)),
        "config-sliding-2e63": cfg(lambda c: c.update(model_type="mistral", sliding_window=2**63)),
        "config-llama3-original-1e400": cfg(lambda c: c.update(rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 10**400})),
        "config-fifo": fifo("config.json"),
        "config-loop": loop("config.json"),
        "weights-missing": remove("model.safetensors"),
        "weights-fifo": fifo("model.safetensors"),
        "weights-loop": loop("model.safetensors"),
        "weights-empty": write("model.safetensors", b""),
        "weights-nan-linear": nan_weight("mlp.up_proj.weight", np.nan),
        "weights-inf-norm": nan_weight("post_attention_layernorm.weight", np.inf),
        "weights-neginf-embed": nan_weight("embed_tokens.weight", -np.inf),
        "tokenizer-garbage": write("tokenizer.json", "{not json"),
        "tokenizer-wrong-json": write("tokenizer.json", "{\"model\": 3}"),
        "tokenizer-binary": write("tokenizer.json", os.urandom(64) if False else bytes(range(256))),
        "chat-template-broken": write("tokenizer_config.json",
                                      json.dumps({"chat_template": "{% for m in messages %}{{ m"})),
        "chat-template-not-json": write("tokenizer_config.json", "{nope"),
        "chat-template-divides-by-zero": write("tokenizer_config.json", json.dumps({"chat_template": "{{ 1/0 }}"})),
        "chat-template-adds-a-number": write("tokenizer_config.json", json.dumps(
            {"chat_template": "{{ messages[0].content + 1 }}"})),
        "tokenizer-fifo": fifo("tokenizer.json"),
        "tokenizer-loop": loop("tokenizer.json"),
        "jinja-not-utf8": write("chat_template.jinja", b"\xff\xfe{{ messages }}"),
        "extra-pickle-only": lambda d: ((d / "model.safetensors").unlink(),
                                        (d / "pytorch_model.bin").write_bytes(b"x")),
    }
    cases = []
    for ename, edit in edits.items():
        def build(work, base, edit=edit, ename=ename):
            d = work / "m"
            shutil.copytree(base.hf, d)
            edit(d)
            if ename.startswith("chat-template"):   # used only by a chat prompt
                return ("run", ["--weights", str(d), "--prompt", "hi", "--max-new-tokens", "1", "--device", "cpu"])
            return _run(d, api=ename.endswith(("1e9", "fifo", "loop", "nan-linear")))
        cases.append(Case(f"hf-{ename}", build))

    def index(fn):
        return json_edit("model.safetensors.index.json", fn)

    def wm(fn):
        return index(lambda doc: fn(doc["weight_map"]))

    iedits = {
        "not-json": lambda d: (d / "model.safetensors.index.json").write_text("{oops"),
        "no-map": index(lambda doc: doc.pop("weight_map")),
        "empty-map": index(lambda doc: doc.update(weight_map={})),
        "map-list": index(lambda doc: doc.update(weight_map=[1, 2])),
        "shard-missing": wm(lambda m: m.update({k: "model-00009-of-00009.safetensors" for k in list(m)[:1]})),
        "shard-traversal": wm(lambda m: m.update({k: "../hf/model.safetensors" for k in list(m)[:1]})),
        "shard-abs": wm(lambda m: m.update({k: "/etc/passwd" for k in list(m)[:1]})),
        "shard-int": wm(lambda m: m.update({k: 7 for k in list(m)[:1]})),
        "wrong-shard": wm(lambda m: m.update({k: ("model-00001-of-00002.safetensors"
                                                   if v == "model-00002-of-00002.safetensors" else
                                                   "model-00002-of-00002.safetensors")
                                               for k, v in list(m.items())[:1]})),
        "shard-duplicate-tensor": lambda d: _dup_tensor_across_shards(d),
    }
    for ename, edit in iedits.items():
        def build(work, base, edit=edit):
            d = work / "m"
            shutil.copytree(base.hf_sharded, d)
            edit(d)
            return _run(d)
        cases.append(Case(f"hf-index-{ename}", build))
    return cases


def _dup_tensor_across_shards(d: Path):
    """Shard 2 also holds a tensor of shard 1 (same name, same bytes)."""
    from engine.io.safetensors import read_safetensors, write_safetensors
    s1, s2 = d / "model-00001-of-00002.safetensors", d / "model-00002-of-00002.safetensors"
    t1, _ = read_safetensors(s1)
    t2, meta = read_safetensors(s2)
    n = next(iter(t1))
    t2[n] = t1[n]
    write_safetensors(s2, t2, meta)


# ----------------------------------------------------------------------------- GGUF

@contextlib.contextmanager
def _gguf_hook(hook):
    """Run `hook(writer)` just before the gguf package's writer lays out the header, so a case
    can tamper with the metadata and tensor infos through the real writer."""
    import gguf
    orig = gguf.GGUFWriter

    class Hooked(orig):
        def write_header_to_file(self, *a, **kw):
            hook(self)
            return super().write_header_to_file(*a, **kw)

    gguf.GGUFWriter = Hooked
    try:
        yield
    finally:
        gguf.GGUFWriter = orig


def gguf_cases() -> list[Case]:
    import gguf
    from gguf.gguf_writer import GGUFValue
    T = gguf.GGUFValueType

    def kv(key, value, vtype):
        return lambda w: w.kv_data[0].__setitem__(key, GGUFValue(value, vtype))

    def drop_kv(key):
        return lambda w: w.kv_data[0].pop(key, None)

    def drop_tensor(name):
        return lambda w: w.tensors[0].pop(name)

    def poison(name, value):
        def h(w):
            ti = w.tensors[0][name]
            a = np.array(ti.tensor, copy=True)
            a.reshape(-1)[0] = value
            ti.tensor = a
        return h

    def shape_lie(name):
        def h(w):
            ti = w.tensors[0][name]
            ti.shape = tuple(reversed(ti.shape)) if len(ti.shape) == 2 and ti.shape[0] != ti.shape[1] \
                else tuple(ti.shape) + (2,)
        return h

    hooks = {
        "layers-1e9": kv("llama.block_count", 10**9, T.UINT32),
        "layers-1000": kv("llama.block_count", 1000, T.UINT32),
        "layers-3": kv("llama.block_count", 3, T.UINT32),
        "layers-0": kv("llama.block_count", 0, T.UINT32),
        "layers-string": kv("llama.block_count", "2", T.STRING),
        "layers-float": kv("llama.block_count", 2.0, T.FLOAT32),
        "context-1e13": kv("llama.context_length", 10**13, T.UINT64),
        "context-0": kv("llama.context_length", 0, T.UINT32),
        "embedding-0": kv("llama.embedding_length", 0, T.UINT32),
        "embedding-64": kv("llama.embedding_length", 64, T.UINT32),
        "heads-0": kv("llama.attention.head_count", 0, T.UINT32),
        "heads-7": kv("llama.attention.head_count", 7, T.UINT32),
        "kv-heads-3": kv("llama.attention.head_count_kv", 3, T.UINT32),
        "ffn-missing": drop_kv("llama.feed_forward_length"),
        "arch-gpt2": kv("general.architecture", "gpt2", T.STRING),
        "arch-missing": drop_kv("general.architecture"),
        "arch-array": kv("general.architecture", ["llama"], T.ARRAY),
        "eos-2e60": kv("tokenizer.ggml.eos_token_id", 2**60, T.UINT64),
        "tensor-embd-0d": lambda w: setattr(w.tensors[0]["token_embd.weight"], "shape", ()),
        "rope-nan": kv("llama.rope.freq_base", float("nan"), T.FLOAT32),
        "eps-neg": kv("llama.attention.layer_norm_rms_epsilon", -1.0, T.FLOAT32),
        "rope-dim-partial": kv("llama.rope.dimension_count", 4, T.UINT32),
        "tok-model-llama": kv("tokenizer.ggml.model", "llama", T.STRING),
        "tok-pre-unknown": kv("tokenizer.ggml.pre", "xyz", T.STRING),
        "tok-tokens-missing": drop_kv("tokenizer.ggml.tokens"),
        "tok-merges-missing": drop_kv("tokenizer.ggml.merges"),
        "tok-types-short": kv("tokenizer.ggml.token_type", [1, 1, 1], T.ARRAY),
        "tok-merges-bad": kv("tokenizer.ggml.merges", ["nospace", "a b c d"], T.ARRAY),
        "tok-dup-tokens": kv("tokenizer.ggml.tokens", ["a"] * 144, T.ARRAY),
        "bos-negative": kv("tokenizer.ggml.bos_token_id", -5, T.INT32),
        "chat-template-int": kv("tokenizer.chat_template", 5, T.UINT32),
        "tensor-dropped": drop_tensor("blk.1.ffn_up.weight"),
        "tensor-embd-dropped": drop_tensor("output_norm.weight"),
        "tensor-nan": poison("blk.0.attn_q.weight", np.nan),
        "tensor-inf": poison("output_norm.weight", np.inf),
        "tensor-shape-lie": shape_lie("blk.0.ffn_down.weight"),
        "tensor-extra": lambda w: w.tensors[0].__setitem__(
            "blk.0.attn_q.bias", type(w.tensors[0]["output_norm.weight"])(
                shape=(32,), dtype=gguf.GGMLQuantizationType.F32, nbytes=128,
                tensor=np.zeros(32, np.float32))),
    }
    cases = []
    for hname, hook in hooks.items():
        def build(work, base, hook=hook, hname=hname):
            from engine.io.hf_dir import load_hf_dir
            f = work / "m.gguf"
            with _gguf_hook(hook):
                write_tiny_gguf(f, load_hf_dir(base.hf))
            return _run(f, api=hname.startswith(("layers", "tensor-nan")))
        cases.append(Case(f"gguf-meta-{hname}", build))

    # Byte-level damage of a valid file: truncations short of the trailing alignment padding,
    # and lies in the fixed header (magic, version, tensor and key counts).
    for where in ("0", "3", "4", "8", "16", "24", "100", "kv_mid", "info_end", "data_mid", "size-64"):
        def build(work, base, where=where):
            f = work / "m.gguf"
            raw = base.gguf.read_bytes()
            data_off = _gguf_data_offset(base.gguf)
            at = {"kv_mid": data_off // 3, "info_end": data_off - 40, "data_mid": (data_off + len(raw)) // 2,
                  "size-64": len(raw) - 64}.get(where)
            f.write_bytes(raw[:int(where) if at is None else at])
            return _run(f, api=where == "kv_mid")
        cases.append(Case(f"gguf-truncate-{where}", build))
    for field, off, fmt, values in (("magic", 0, "4s", (b"GGUG", b"\x00\x00\x00\x00")),
                                   ("version", 4, "<I", (0, 1, 99, 2**31)),
                                   ("n_tensors", 8, "<Q", (2**40, 2**63, 10**6)),
                                   ("n_kv", 16, "<Q", (2**40, 2**63, 10**6))):
        for v in values:
            def build(work, base, off=off, fmt=fmt, v=v):
                f = work / "m.gguf"
                raw = bytearray(base.gguf.read_bytes())
                struct.pack_into(fmt, raw, off, v)
                f.write_bytes(bytes(raw))
                return _run(f)
            cases.append(Case(f"gguf-header-{field}-{v!r}", build))
    return cases


def gguf_offset_cases() -> list[Case]:
    """Lies in a tensor info's data offset (patched in the file the gguf writer produced): the
    same bytes as another tensor, bytes shifted into a neighbour, or past the end."""
    cases = []
    for mode in ("same", "shifted", "beyond", "huge"):
        def build(work, base, mode=mode):
            import gguf
            f = work / "m.gguf"
            raw = bytearray(base.gguf.read_bytes())
            r = gguf.GGUFReader(base.gguf)
            by = {t.name: t for t in r.tensors}
            a, b = by["blk.0.attn_norm.weight"], by["blk.0.ffn_norm.weight"]        # both (H,) F32
            rel = lambda t: int(t.data_offset) - int(r.data_offset)                # noqa: E731
            new = {"same": rel(a), "shifted": rel(a) + 32, "beyond": len(raw), "huge": 2**62}[mode]
            pos = b.field.offset + sum(p.nbytes for p in b.field.parts[:-1])
            struct.pack_into("<Q", raw, pos, new)
            f.write_bytes(bytes(raw))
            return _run(f, api=mode == "same")
        cases.append(Case(f"gguf-offset-{mode}", build))
    return cases


def digit_cases() -> list[Case]:
    """Seeded random digit changes in a tensor entry's shape or data_offsets: any one changed
    digit breaks size == (end - begin) for that entry, so each must be refused."""
    cases = []
    for t in ST_TARGETS:
        for i in range(12):
            def build(work, base, t=t, i=i):
                rng = np.random.default_rng(1000 * len(t) + i)
                f, w, _ = copy_target(t, work, base)
                h, data = st_parse(f)
                names = sorted(tensor_names(h))
                e = h[names[int(rng.integers(len(names)))]]
                field = "shape" if rng.random() < 0.5 else "data_offsets"
                j = int(rng.integers(len(e[field])))
                digits = list(str(e[field][j]))
                k = int(rng.integers(len(digits)))
                digits[k] = str((int(digits[k]) + int(rng.integers(1, 10))) % 10)
                e[field][j] = int("".join(digits))
                f.write_bytes(st_build(h, data))
                return _run(w, api=i % 4 == 0)
            cases.append(Case(f"st-digit-{t}-{i}", build))
    return cases


def _gguf_data_offset(path: Path) -> int:
    import gguf
    return int(gguf.GGUFReader(path).data_offset)


# ----------------------------------------------------------------------------- random bytes, text, flags

def random_cases() -> list[Case]:
    cases = []
    for size in (0, 1, 8, 16, 100, 1000, 5000):
        for suffix in (".safetensors", ".gguf", ".bin", ""):
            def build(work, base, size=size, suffix=suffix):
                rng = np.random.default_rng(size * 31 + len(suffix))
                f = work / f"weights{suffix}"
                f.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
                return _run(f, api=size == 1000)
            cases.append(Case(f"random-{size}-{suffix or 'nosuffix'}", build))
    for i in range(4):
        def build(work, base, i=i):
            rng = np.random.default_rng(100 + i)
            f = work / ("magic.gguf" if i % 2 else "magic")
            f.write_bytes(b"GGUF" + rng.integers(0, 256, 64 + 500 * i, dtype=np.uint8).tobytes())
            return _run(f)
        cases.append(Case(f"random-gguf-magic-{i}", build))
    for i in range(4):
        def build(work, base, i=i):
            rng = np.random.default_rng(200 + i)
            junk = rng.integers(0, 256, 40 + 30 * i, dtype=np.uint8).tobytes()
            f = work / "junk.q.safetensors"
            f.write_bytes(struct.pack("<Q", len(junk)) + junk + b"\x00" * 64)
            return _run(f, api=i == 0)
        cases.append(Case(f"random-safetensors-header-{i}", build))
    return cases


def text_cases() -> list[Case]:
    def t(content=None, kind="file"):
        def build(work, base):
            p = work / "t.txt"
            if kind == "fifo":
                os.mkfifo(p)
            elif kind == "dir":
                p.mkdir()
            elif kind == "loop":
                os.symlink(work / "u.txt", p)
                os.symlink(p, work / "u.txt")
            else:
                p.write_bytes(content)
            return ("eval", ["--weights", str(base.hf), "--text", str(p), "--window", "16", "--device", "cpu"])
        return build
    return [Case("text-latin1", t("caf\xe9 ".encode("latin-1") * 50)),
            Case("text-empty", t(b"")),
            Case("text-blank", t(b" \n\n\t ")),
            Case("text-binary", t(bytes(range(256)) * 4)),
            Case("text-fifo", t(kind="fifo")),
            Case("text-dir", t(kind="dir")),
            Case("text-loop", t(kind="loop")),
            Case("text-too-short", t(b"the cat")),
            ]


def flag_cases() -> list[Case]:
    def run_(*extra, weights="hf"):
        def build(work, base):
            w = getattr(base, weights)
            args = ["--weights", str(w), "--prompt", "hi", "--raw", "--device", "cpu"]
            return ("run", args + list(extra))
        return build

    def eval_(*extra):
        return lambda work, base: ("eval", ["--weights", str(base.hf), "--text", str(base.text),
                                            "--device", "cpu"] + list(extra))

    def quant(*extra, model="hf"):
        def build(work, base):
            m = [] if model is None else [str(getattr(base, model))]
            return ("quantize", m + ["--out", str(work / "o.q.safetensors"), "--quiet"] + list(extra))
        return build

    def export(*extra, model="hf"):
        return lambda work, base: ("export", [str(getattr(base, model)), "--out", str(work / "x")] + list(extra))

    cases = {
        "run-max-new-0": run_("--max-new-tokens", "0"),
        "run-max-new-neg": run_("--max-new-tokens", "-5"),
        "run-max-new-str": run_("--max-new-tokens", "many"),
        "run-temp-neg": run_("--temperature", "-1"),
        "run-temp-nan": run_("--temperature", "nan"),
        "run-temp-inf": run_("--temperature", "inf"),
        "run-top-p-0": run_("--top-p", "0"),
        "run-top-p-big": run_("--top-p", "1.5"),
        "run-top-p-nan": run_("--top-p", "nan"),
        "run-top-k-neg": run_("--top-k", "-1"),
        "run-seed-neg": run_("--seed", "-1"),
        "run-seed-huge": run_("--seed", str(2**70)),
        "run-device-bogus": run_("--device", "tpu"),
        "run-lm-head-bogus": run_("--lm-head", "int4"),
        "run-prompt-not-utf8": lambda work, base: ("run", ["--weights", str(base.hf), "--prompt", "caf\udce9",
                                                           "--raw", "--device", "cpu"]),
        "run-prompt-empty": lambda work, base: ("run", ["--weights", str(base.hf), "--prompt", "",
                                                        "--device", "cpu"]),
        "run-prompt-too-long": lambda work, base: ("run", ["--weights", str(base.hf), "--prompt", "x " * 300,
                                                           "--raw", "--device", "cpu"]),
        "run-weights-empty": lambda work, base: ("run", ["--weights", "", "--prompt", "hi", "--device", "cpu"]),
        "run-weights-missing": lambda work, base: ("run", ["--weights", str(work / "nope"), "--prompt", "hi",
                                                           "--device", "cpu"]),
        "eval-window-1": eval_("--window", "1"),
        "eval-window-0": eval_("--window", "0"),
        "eval-window-beyond-context": eval_("--window", "4096"),
        "eval-max-windows-0": eval_("--max-windows", "0"),
        "eval-both-sources": eval_("--corpus", "wiki"),
        "eval-no-source": lambda work, base: ("eval", ["--weights", str(base.hf), "--device", "cpu"]),
        "quant-n-seq-0": quant("--n-seq", "0"),
        "quant-n-seq-neg": quant("--n-seq", "-3"),
        "quant-seq-len-0": quant("--seq-len", "0"),
        "quant-seq-len-beyond-context": quant("--seq-len", "4096", "--calib", "random", "--n-seq", "1"),
        "quant-tokens-huge": quant("--n-seq", "100000", "--seq-len", "100000", "--calib", "random"),
        "quant-wbits-5": quant("--wbits", "5"),
        "quant-wbits-8-dgq": quant("--wbits", "8"),
        "quant-pot-wbits-4-group-48": quant("--method", "pot", "--group", "48"),
        "quant-pot-wbits-5": quant("--method", "pot", "--wbits", "5"),
        "quant-group-0": quant("--group", "0"),
        "quant-method-bogus": quant("--method", "gptq"),
        "quant-calib-missing": quant("--calib", "/nonexistent/calib.txt"),
        "quant-calib-dir": lambda work, base: ("quantize", [str(base.hf), "--out", str(work / "o.q.safetensors"),
                                                            "--calib", str(work), "--quiet"]),
        "quant-model-quantized": quant("--method", "w4a16", model="q_g"),
        "quant-out-is-dir": lambda work, base: ("quantize", [str(base.hf), "--out", str(work), "--quiet",
                                                             "--method", "w4a16"]),
        "quant-out-no-parent": lambda work, base: ("quantize", [str(base.hf), "--out",
                                                                str(work / "no" / "o.q.safetensors"),
                                                                "--quiet", "--method", "w4a16"]),
        "quant-out-empty": lambda work, base: ("quantize", [str(base.hf), "--out", "", "--quiet"]),
        "export-shard-size-bad": export("--shard-size", "lots"),
        "export-shard-size-0": export("--shard-size", "0"),
        "export-shard-size-neg": export("--shard-size", "-5MB"),
        "export-dtype-bogus": export("--dtype", "int8"),
        "export-quantized": export(model="q_g"),
        "export-out-is-file": lambda work, base: ("export", [str(base.hf), "--out", str(base.text)]),
        "export-out-is-input": lambda work, base: ("export", [str(base.hf), "--out", str(base.hf), "--overwrite"]),
        "export-out-above-input": lambda work, base: ("export", [str(base.hf), "--out", str(base.root), "--overwrite"]),
    }
    return [Case(f"flag-{k}", v) for k, v in cases.items()]


def all_cases() -> list[Case]:
    out = (st_truncations() + st_length_lies() + st_entry_lies() + st_overlaps() + st_json_mutations()
           + q_metadata_cases() + q_value_cases() + hf_cases() + gguf_cases() + gguf_offset_cases()
           + digit_cases() + random_cases()
           + text_cases() + flag_cases())
    names = [c.name for c in out]
    assert len(names) == len(set(names)), "duplicate case names"
    return out
