"""Converter at scale: `python -m engine.bench quantize --shape tinyllama|llama7b` (CPU only).

Builds a random Hugging Face checkpoint of that shape (fp16 shards, N(0, 0.02) linears,
norms near 1, written tensor by tensor so the builder holds one tensor), then runs
`dgq-quantize` on it in a child process, exactly as a user would, and reports the wall time
of each phase (from the file's recipe: reading weights, calibration statistics, the weight
search, the sequential forward, writing) and the child's peak RSS (its own ru_maxrss, from
os.wait4: the converter alone, not this builder). Last, the file is read back with the engine's
loader (every tensor checked). Random weights have no activation outliers, so the times and
memory are representative but the search's results are not (quality: docs/QUALITY.md).

The checkpoint and the q file go under --dir (default: a new temporary directory) and are
deleted afterwards unless --keep. TinyLlama-shaped: 2.2 GB; Llama-7B-shaped: 13.5 GB.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
import dataclasses
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ..io.config import ModelConfig
from ..io.layout import expected_shapes
from ..io.qfile import load_qfile
from ..io.shapes import shape_config as named_shape
from ..util.files import atomic_file
from .common import BenchError

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,  # tests
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
SHAPES = ("tinyllama", "llama7b", "tiny")   # named shapes: engine/io/shapes.py, plus the tests' tiny one
SHARD_BYTES = 2 << 30


def shape_config(shape: str) -> ModelConfig:
    if shape not in SHAPES:
        raise BenchError(f"--shape: unknown {shape!r}; choose from {', '.join(SHAPES)}")
    base = ModelConfig(**TINY) if shape == "tiny" else named_shape(shape)
    return dataclasses.replace(base, bos_token_id=1, eos_token_id=2)


def _tokenizer_json() -> str:
    """A word-level tokenizer of a few entries: the converter calibrates on random ids, and the
    file only needs a valid tokenizer.json to carry."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "the": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def _write_shard(path: Path, names: list[str], shapes: dict, rng) -> int:
    """One fp16 safetensors shard, its tensors generated and written one at a time."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for n in names:
        nbytes = 2 * int(np.prod(shapes[n]))
        header[n] = {"dtype": "F16", "shape": list(shapes[n]), "data_offsets": [off, off + nbytes]}
        off += nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with atomic_file(path, flag="--dir") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for n in names:
            shape = shapes[n]
            if len(shape) == 1:
                a = (1.0 + 0.05 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)  # norms
            else:
                a = _normal_f16(shape, 0.02, rng)                                    # (N, K)
            f.write(memoryview(a).cast("B"))
            del a
    return 8 + len(hb) + off


def _normal_f16(shape, std: float, rng) -> np.ndarray:
    """N(0, std²) fp16 of `shape`, its row blocks drawn on all cores from generators spawned off
    rng's seed (NumPy's generators release the GIL); deterministic for a given rng state."""
    out = np.empty(shape, dtype=np.float16)
    blocks = np.array_split(np.arange(shape[0]), max(1, min(os.cpu_count() or 1, shape[0])))
    gens = [np.random.default_rng(s) for s in rng.bit_generator.seed_seq.spawn(len(blocks))]

    def fill(i):
        b = blocks[i]
        if b.size:
            out[b[0]:b[-1] + 1] = std * gens[i].standard_normal((b.size,) + tuple(shape[1:]), dtype=np.float32)

    with ThreadPoolExecutor(len(blocks)) as ex:
        list(ex.map(fill, range(len(blocks))))
    return out


def build_checkpoint(d: Path, config: ModelConfig, seed: int = 0) -> int:
    """A random HF directory of `config`'s shape in fp16 shards; returns the bytes written."""
    d.mkdir(parents=True, exist_ok=True)
    shapes = expected_shapes(config)
    shards, cur, used = [], [], 0
    for n, s in shapes.items():
        nbytes = 2 * int(np.prod(s))
        if cur and used + nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, used = [], 0
        cur.append(n)
        used += nbytes
    shards.append(cur)
    rng = np.random.default_rng(seed)
    total, wmap = 0, {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += _write_shard(d / fname, names, shapes, rng)
        wmap.update({n: fname for n in names})
    cfg = config.to_hf()
    cfg["torch_dtype"] = "float16"
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": wmap}))
    (d / "tokenizer.json").write_text(_tokenizer_json())
    return total


class _GpuPeak:
    """The most GPU memory one process held, polled through NVML (nvidia-ml-py) every 0.2 s."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        try:
            import pynvml  # noqa: PLC0415
            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:                                # no NVML: no figure, said in the table
            self._nvml = None
            return
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.2):
            for h in self._handles:
                try:
                    procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(h)
                except Exception:
                    continue
                for p in procs:
                    if p.pid == self.pid and p.usedGpuMemory:
                        self.peak = max(self.peak, int(p.usedGpuMemory))

    def stop(self) -> float | None:
        """MiB, or None where NVML is missing."""
        if self._nvml is None:
            return None
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


# The methods that read no calibration text by default (converters.quantize.needs_calibration;
# tests/test_streaming.py checks the two agree): dgq-quantize refuses --calib for them.
UNCALIBRATED = ("w4a16", "int-rtn")


def run_quantize(model_dir: Path, out: Path, method: str, n_seq: int, seq_len: int, calibration: str | None,
                 extra: list[str], gpu: bool = False) -> dict:
    """dgq-quantize in a child process; its wall time, peak RSS and (gpu) peak GPU memory."""
    calib = ["--calib", "random", "--n-seq", str(n_seq), "--seq-len", str(seq_len),
             *(["--calibration", calibration] if calibration else [])]
    uncalibrated = method in UNCALIBRATED and "--kv8" not in extra
    argv = [str(model_dir), "--out", str(out), "--method", method, *([] if uncalibrated else calib), *extra]
    code = "import sys; sys.argv[0] = 'dgq-quantize'; from dgq_cli import quantize_main; quantize_main()"
    root = Path(__file__).resolve().parents[2]                  # the checkout: dgq_cli.py lives there
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, *argv], env=env)
    poll = _GpuPeak(child.pid) if gpu else None
    # A SIGTERM/SIGHUP to this bench (e.g. `timeout`) goes on to the converter, whose atomic
    # writer then removes its half-written file; without this it would run on as an orphan.
    forwarded = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            forwarded[sig] = signal.signal(sig, lambda signum, _f: child.send_signal(signum))
    try:
        _, status, usage = os.wait4(child.pid, 0)        # this child's own rusage, not all children's
    except BaseException:
        child.terminate()                                # SIGTERM: the child cleans its temporaries
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise
    finally:
        for sig, old in forwarded.items():
            signal.signal(sig, old)
        gpu_mb = poll.stop() if poll is not None else None
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if child.returncode != 0:
        raise BenchError(f"dgq-quantize failed (exit status {child.returncode})")
    peak = usage.ru_maxrss                               # KiB on Linux
    return {"wall_s": wall, "peak_rss_mb": peak / 1024.0, "peak_gpu_mb": gpu_mb}


def cmd_quantize(args) -> int:
    config = shape_config(args.shape)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix=f"dgq-bench-{args.shape}-"))
    model_dir, out = base / f"{args.shape}-random-fp16", base / f"{args.shape}-{args.method}.q.safetensors"
    need = 2 * sum(int(np.prod(s)) for s in expected_shapes(config).values()) * 1.6
    free = shutil.disk_usage(base if base.exists() else base.parent).free
    if not (model_dir / "config.json").exists() and free < need:
        raise BenchError(f"--dir {base}: {free / 1e9:.1f} GB free, the checkpoint and the q file need "
                         f"about {need / 1e9:.1f} GB")
    try:
        t0 = time.perf_counter()
        if (model_dir / "config.json").exists():
            print(f"reusing {model_dir}", flush=True)
        else:
            size = build_checkpoint(model_dir, config, args.seed)
            print(f"built {model_dir}: {size / 1e9:.2f} GB fp16 in {time.perf_counter() - t0:.0f} s", flush=True)
        extra = (["--quiet"] if args.quiet else []) + ["--device", args.device]
        if args.group:
            extra += ["--group", str(args.group)]
        res = run_quantize(model_dir, out, args.method, args.n_seq, args.seq_len, args.calibration, extra,
                           gpu=args.device != "cpu")
        t = time.perf_counter()
        q = load_qfile(out)
        load_s = time.perf_counter() - t
        recipe = q.recipe
        del q
        rows = [("read float weights", recipe["phase_s"]["load"]),
                ("calibration statistics", recipe["phase_s"]["calibrate"]),
                ("weight quantization (search)", recipe["phase_s"]["quantize"]),
                ("sequential forward (quantized layers)", recipe["phase_s"]["propagate"]),
                ("write the file", recipe["phase_s"]["write"])]
        L = config.num_hidden_layers
        mode = recipe.get("calibration", {}).get("mode")
        lines = [f"`python -m engine.bench quantize --shape {args.shape} --method {args.method} --n-seq {args.n_seq} "
                 f"--seq-len {args.seq_len} --device {args.device}`, {mode} calibration, searches on "
                 f"{recipe.get('search_device', 'cpu')} ({os.cpu_count()} CPU cores)", "",
                 "| phase | seconds | per layer |", "|---|---:|---:|"]
        lines += [f"| {name} | {s:.0f} | {s / L:.1f} |" for name, s in rows]
        lines += [f"| **dgq-quantize wall time** | **{res['wall_s']:.0f}** | {res['wall_s'] / L:.1f} |", "",
                  f"peak RSS of dgq-quantize: **{res['peak_rss_mb']:.0f} MB**"
                  + (f"; peak GPU memory **{res['peak_gpu_mb']:.0f} MiB**" if res["peak_gpu_mb"] else "")
                  + f"; q file "
                  f"{out.stat().st_size / 2**20:.0f} MiB (embeddings {recipe.get('embed_dtype')}); "
                  f"read back by engine.io.qfile.load_qfile in {load_s:.0f} s"]
        table = "\n".join(lines)
        print(table, flush=True)
        if args.md:
            with open(args.md, "a") as f:
                f.write(table + "\n\n")
        if args.json:
            print(json.dumps({"shape": args.shape, "method": args.method, "n_seq": args.n_seq,
                              "seq_len": args.seq_len, "calibration": mode, **res,
                              "phase_s": recipe["phase_s"], "file_bytes": out.stat().st_size}))
    finally:
        if not args.keep:
            shutil.rmtree(model_dir, ignore_errors=True)
            if out.exists():
                out.unlink()
            if not args.dir:
                shutil.rmtree(base, ignore_errors=True)
    return 0


def add_parser(sub) -> None:
    q = sub.add_parser("quantize", help="dgq-quantize on a random TinyLlama- or Llama-7B-shaped checkpoint: "
                                        "time per phase and peak RSS (CPU)")
    q.add_argument("--shape", choices=SHAPES, default="tinyllama")
    q.add_argument("--method", default="dgq")
    q.add_argument("--n-seq", type=int, default=8)
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--group", type=int, default=None)
    q.add_argument("--calibration", choices=("float", "sequential"), default=None,
                   help="default: the method's (converters/quantize.py MethodSpec.calibration)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                   help="dgq-quantize --device: where the weight searches run (cuda also reports peak GPU memory)")
    q.add_argument("--dir", default=None, help="where the checkpoint and the q file go (default: a temp dir)")
    q.add_argument("--keep", action="store_true", help="keep the checkpoint and the q file (reused by a later run)")
    q.add_argument("--quiet", action="store_true", help="no progress bars from dgq-quantize")
    q.add_argument("--md", metavar="PATH", help="also append the markdown table to PATH")
    q.add_argument("--json", action="store_true", help="also print one JSON object")
    q.set_defaults(func=cmd_quantize, needs_gpu=False, reps=1)
