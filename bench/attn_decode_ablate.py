"""Where attn_decode_gqa's time goes, at the Llama-2-7B attention shape (32 query and kv heads,
D = 128, batch 1 or --batch B sequences of the same length), on the GPU:

    python bench/attn_decode_ablate.py [--contexts 2048,8192] [--batch 32] [--variants base,ringonly,...] > out.jsonl
    python bench/attn_decode_ablate.py --splits > out.jsonl

The kernel alone (plain back-to-back launches, the engine's launcher arguments), against variants
compiled in the same process from cuda/attention.cu with one piece of source patched out:
ringonly (the cp.async ring streams, no math), mathonly (the math on whatever the ring holds, no
copies), nolo (P·V without its fp16 lo half), noloop (no key loop: the prologue's copies, q, the
merge), zfill and ringonly_zfill (the copies in cp.async's zero-filling form, with a src-size
operand, as the kernel had them before 2026-12-03), cg and ringonly_cg (K/V through cp.async.cg,
as before 2026-12-03, not .ca), cg8 (int8 K/V alone through .cg: the kernel of 2026-12-03), nol2
(the K/V copies without the .L2::128B prefetch: the kernel before 2026-12-04), nokeys (no
copies and no key loop at all: the launch, q, the new token and the merge), nokeys_nomerge (and
no cross-block merge: the launch, q and the block's partial), launchonly (the kernel returns at
once: the launch of this grid alone), noscales (int8: the step's scales are not copied, each lane
reads whatever its slot holds: the K/V codes alone, for timing only). Each patch must match the source exactly once, so a changed kernel fails loudly here
rather than measuring something else. --splits: the engine's launcher with other split counts
(tuning.ATTENTION.gqa_waves, gqa_max_splits). --file NAME=PATH (repeatable): one
more variant compiled from another attention.cu (e.g. `git show REV:cuda/attention.cu > PATH`;
its includes come from cuda/), to compare a kernel change in one process; --patch FILE.json
(repeatable): one more variant per item of an `e2e --patch` file (bench/patches/attn-2026-12-04.json). One JSON line per row: µs a launch
(median of alternating rounds) and GB/s of the K/V bytes read. docs/KERNELS.md cites the H200 run.
"""
import argparse
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

HQ = HKV = 32
D = 128
ORDER = ("qkv", "cos_t", "sin_t", "kc", "vc", "ks", "vs", "lens", "Hq", "Hkv", "D", "cap", "scale", "part_ml",
         "part_acc", "counters", "out", "amax_out")
WAIT = "        cp_async_wait<L::STAGES - 1>();                  // this lane's copies of step i have landed\n"
ISSUE = "        if (i + L::STAGES - 1 < mine) issue(i + L::STAGES - 1);\n"
PROLOGUE = "        if (i < mine) issue(i);\n"
LO = "                mma_row<LEAN>(o[TPW * w + e], pal, b0[e], b1[e]);\n"
LOOP = "    for (int i = 0; i < mine; ++i) {\n"
# the K/V copies: through L1 with an L2 line prefetch (the kernel since 2026-12-04)
COPY16 = "    auto copy16 = [&](u32 dst, const char* src) { cp_async_ca16_l2line(dst, src); };\n"
MINE = "    const int mine = nsteps > warp ?"
MERGE = "    // The last block of the head group merges the `active` partials"
SCALES = "            cp_async_ca<4>(scales(slot) + 4 * lane, (lane < 16 ? ks : vs) + sc(lane & 15));\n"
START = "    if (D != DT || gridDim.x > GQ_MAX_SPLITS) __trap();   // the launcher instantiates by D, caps the splits\n"
# cuda/common.cuh cp_async16(dst, src) and attention.cu cp_async_ca<N>(dst, src): the copies without src-size
CG = 'asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(src) : "memory");'
CA = 'asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" :: "r"(dst), "l"(src), "n"(N) : "memory");'
L2 = 'asm volatile("cp.async.ca.shared.global.L2::128B [%0], [%1], 16;" :: "r"(dst), "l"(src) : "memory");'
# ... in the zero-filling form (src-size in a register, always the whole copy): the kernel before 2026-12-03
CG_Z = 'asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(16) : "memory");'
CA_Z = 'asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" :: "r"(dst), "l"(src), "n"(N), "r"(N) : "memory");'
L2_Z = 'asm volatile("cp.async.ca.shared.global.L2::128B [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(16) : "memory");'


def variants(src: str) -> dict:
    """name -> source of attention.cu with that piece removed (lens[0] keeps the compiler from
    proving a loop empty or a branch dead)."""
    for piece in (WAIT, ISSUE, PROLOGUE, LO, LOOP, CG, CA, L2, COPY16, MINE, MERGE, START, SCALES):
        if src.count(piece) != 1:
            raise SystemExit(f"cuda/attention.cu changed: update the patch {piece.strip()!r}")
    ringonly = src.replace(WAIT, WAIT + "        if (lens[0] > 0) continue;\n")

    def zf(s):
        return s.replace(CG, CG_Z).replace(CA, CA_Z).replace(L2, L2_Z)
    cg = COPY16.replace("cp_async_ca16_l2line(dst, src)", "cp_async16(dst, src)")
    return {"base": src, "ringonly": ringonly, "zfill": zf(src), "ringonly_zfill": zf(ringonly),
            "cg": src.replace(COPY16, cg), "ringonly_cg": ringonly.replace(COPY16, cg),
            "cg8": src.replace(COPY16, COPY16.replace(
                "cp_async_ca16_l2line(dst, src);", "if constexpr (KV8) cp_async16(dst, src); else cp_async_ca16_l2line(dst, src);")),
            "nol2": src.replace(COPY16, COPY16.replace("cp_async_ca16_l2line(dst, src)", "cp_async_ca<16>(dst, src)")),
            "nokeys": src.replace(MINE, "    const int mine = lens[0] < 0 && nsteps > warp ?"),
            "nokeys_nomerge": src.replace(MINE, "    const int mine = lens[0] < 0 && nsteps > warp ?")
                                 .replace(MERGE, "    if (lens[0] > 0) return;\n" + MERGE),
            "launchonly": src.replace(START, START + "    if (lens[0] > 0) return;\n"),
            "mathonly": src.replace(ISSUE, "").replace(PROLOGUE, ""),
            "nolo": src.replace(LO, ""),
            "noscales": src.replace(SCALES, "            if (lens[0] < 0) " + SCALES.lstrip()),
            "noloop": src.replace(LOOP, "    for (int i = 0; i < (lens[0] < 0 ? mine : 0); ++i) {\n")}


def source_of(kernels, path: str) -> str:
    """attention.cu's text from `path` with its includes expanded from cuda/ (kernels.source on a
    copy of cuda/ where attention.cu is that file)."""
    with tempfile.TemporaryDirectory() as tmp:
        for header in Path(kernels.CUDA_DIR).glob("*.cuh"):
            shutil.copy(header, tmp)
        shutil.copy(path, Path(tmp) / "attention.cu")
        saved, kernels.CUDA_DIR = kernels.CUDA_DIR, Path(tmp)
        try:
            return kernels.source("attention.cu")
        finally:
            kernels.CUDA_DIR = saved


def setup(cp, attention, ctx: int, kv8: bool, batch: int = 1):
    """The launcher's keyword arguments for `batch` sequences of ctx keys each (random cache), and
    the K/V bytes a launch reads."""
    cap = ctx + 64
    rng = np.random.default_rng(0)
    B = batch
    if kv8:
        kc, vc = (cp.asarray(rng.integers(-127, 128, (B, cap, HKV, D), dtype=np.int8)) for _ in range(2))
        ks, vs = (cp.asarray(rng.random((B, cap, HKV), dtype=np.float32) * 0.01) for _ in range(2))
    else:
        kc, vc = (cp.random.standard_normal((B, cap, HKV, D), dtype=cp.float32).astype(cp.float16)
                  for _ in range(2))
        ks = vs = cp.ones((1,), cp.float32)
    ang = np.outer(np.arange(cap), 1.0 / (10000.0 ** (np.arange(0, D, 2) / D)))
    nsplit = attention.decode_splits(cap)
    args = dict(qkv=cp.asarray(rng.standard_normal((B, HQ + 2 * HKV, D), dtype=np.float32).astype(np.float16)),
                cos_t=cp.asarray(np.cos(ang).astype(np.float32)), sin_t=cp.asarray(np.sin(ang).astype(np.float32)),
                kc=kc, vc=vc, ks=ks, vs=vs, lens=cp.full((B,), ctx, cp.int32), Hq=HQ, Hkv=HKV, D=D, cap=cap,
                scale=1 / np.sqrt(D), part_ml=cp.zeros((B * HQ * nsplit * 2,), cp.float32),
                part_acc=cp.zeros((B * HQ * nsplit * D,), cp.float32), counters=cp.zeros((B * HQ,), cp.int32),
                out=cp.zeros((B, HQ * D), cp.float16), amax_out=cp.zeros((B,), cp.uint32))
    kv_bytes = B * (2 * ctx * HKV * D * (1 if kv8 else 2) + (2 * ctx * HKV * 4 if kv8 else 0))
    return nsplit, args, kv_bytes


def median_us(cp, launches: dict, rounds: int = 4, reps: int = 100) -> dict:
    """name -> median µs a launch over `rounds` rounds, the order alternating."""
    times = {k: [] for k in launches}
    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
    for r in range(rounds):
        for k in (list(launches) if r % 2 == 0 else list(launches)[::-1]):
            for _ in range(5):
                launches[k]()
            e0.record()
            for _ in range(reps):
                launches[k]()
            e1.record()
            e1.synchronize()
            times[k].append(cp.cuda.get_elapsed_time(e0, e1) * 1e3 / reps)
    return {k: float(np.median(v)) for k, v in times.items()}


def layout_of(src: str) -> str:
    """The text of `struct GqLayout` in an attention.cu source ("" when it has none)."""
    i = src.find("struct GqLayout {")
    return src[i:src.find("};", i)] if i >= 0 else ""


def patched_variants(kernels, src: str, path) -> dict:
    """name -> attention.cu's inlined source with a --patch FILE.json item's edits applied (the
    file format of `python -m engine.bench e2e --patch`; edits of other files are refused here)."""
    from engine.bench.e2e import read_patches  # noqa: PLC0415
    out = {}
    try:
        items = read_patches(path)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    for name, edits, ab in items:
        others = sorted({e[0] for e in edits} - {"attention.cu"})
        if others or ab:
            raise SystemExit(f"--patch {path}: item {name!r} edits {others or 'settings'}; this bench "
                             "times attn_decode_gqa from cuda/attention.cu alone")
        out[name] = kernels.apply_edits("attention.cu", src, edits)
        if layout_of(out[name]) != layout_of(src):        # shared memory is sized for today's layout
            raise SystemExit(f"--patch {path}: item {name!r} changes GqLayout; this bench sizes shared memory "
                             "for today's (gpu/attention.py gqa_smem)")
    return out


def run_variants(cp, attention, kernels, contexts, names, files=(), batch: int = 1, patches=()):
    srcs = variants(kernels.source("attention.cu"))
    for path in patches:
        for name, code in patched_variants(kernels, srcs["base"], path).items():
            if name in srcs:
                raise SystemExit(f"--patch {path}: variant {name!r} exists already")
            srcs[name] = code
            names = [*names, name]
    for spec in files:
        name, _, path = spec.partition("=")
        if not path or name in srcs:
            raise SystemExit(f"--file wants NAME=PATH with a new NAME, not {spec!r}")
        srcs[name] = source_of(kernels, path)
        if layout_of(srcs[name]) != layout_of(srcs["base"]):     # shared memory and scratch are sized for today's
            raise SystemExit(f"--file {spec}: its GqLayout differs from cuda/attention.cu's; this bench sizes shared "
                             "memory for today's layout (gpu/attention.py gqa_smem), so that kernel would run out "
                             "of bounds (as an INT8 run of 2026-12-03 did): compare trees with the same layout")
        names = [*names, name]
    unknown = set(names) - set(srcs)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {sorted(srcs)}")
    arch = f"sm_{kernels.device_info()['cc']}" + ("a" if kernels.device_info()["cc"] == 90 else "")
    exprs = [f"attn_decode_gqa<{t}, {D}>" for t in ("__half", "signed char")]
    mods = {n: cp.RawModule(code=srcs[n], options=("--std=c++17", f"--gpu-architecture={arch}"),
                            name_expressions=exprs) for n in names}
    info = kernels.device_info()
    for ctx in contexts:
        for kv8 in (False, True):
            nsplit, args, kv_bytes = setup(cp, attention, ctx, kv8, batch)
            vals = tuple(np.float32(args[n]) if n == "scale" else np.int32(args[n]) if isinstance(args[n], int)
                         else args[n] for n in ORDER)
            smem = attention.gqa_smem(D, kv8)
            launches, regs = {}, {}
            for n in names:
                fn = mods[n].get_function(exprs[kv8])
                fn.max_dynamic_shared_size_bytes = smem
                ns = attention.gqa_splits(batch, HQ, HKV, D, kv8, nsplit, info["sm_count"], info["smem_optin"] + 1024,
                                          fn.num_regs)
                launches[n] = (lambda fn=fn, ns=ns: fn((ns, HKV, batch), (attention.ATTENTION.threads,), vals,
                                                       shared_mem=smem))
                regs[n] = fn.num_regs
            for n, us in median_us(cp, launches).items():
                print(json.dumps(dict(ctx=ctx, batch=batch, kv="int8" if kv8 else "fp16", variant=n, regs=regs[n],
                                      us=round(us, 2), gbs=round(kv_bytes / us / 1e3, 1))), flush=True)


def run_splits(cp, attention, contexts):
    base = attention.ATTENTION
    configs = [("heads", 1, 32), ("gqa", 1, 32), ("gqa", 2, 32), ("gqa", 4, 64), ("gqa", 8, 64)]
    saved_kernel = attention.DECODE_KERNEL
    try:
        for ctx in contexts:
            for kv8 in (False, True):
                nsplit, args, kv_bytes = setup(cp, attention, ctx, kv8)
                for kernel, waves, max_splits in configs:
                    attention.DECODE_KERNEL = kernel
                    attention.ATTENTION = dataclasses.replace(base, gqa_waves=waves, gqa_max_splits=max_splits)
                    attention._GQA_LAUNCH.clear()
                    a = args

                    def launch():
                        attention.attn_decode(1, nsplit, 0, qkv=a["qkv"], cos_t=a["cos_t"], sin_t=a["sin_t"],
                                              kc=a["kc"], vc=a["vc"], ks=a["ks"], vs=a["vs"], lens=a["lens"],
                                              Hq=a["Hq"], Hkv=a["Hkv"], D=a["D"], cap=a["cap"], scale=a["scale"],
                                              part_ml=a["part_ml"], part_acc=a["part_acc"],
                                              counters=a["counters"], out=a["out"], amax_out=a["amax_out"])

                    us = median_us(cp, {kernel: launch}, rounds=1, reps=200)[kernel]
                    grid = next(iter(attention._GQA_LAUNCH.values()))[1] if attention._GQA_LAUNCH else None
                    print(json.dumps(dict(ctx=ctx, kv="int8" if kv8 else "fp16", kernel=kernel, waves=waves,
                                          max_splits=max_splits, grid=grid, us=round(us, 2),
                                          gbs=round(kv_bytes / us / 1e3, 1))), flush=True)
    finally:
        attention.ATTENTION, attention.DECODE_KERNEL = base, saved_kernel
        attention._GQA_LAUNCH.clear()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="2048,8192")
    ap.add_argument("--variants", default="base,cg,ringonly,mathonly,noloop,nokeys,nokeys_nomerge,launchonly")
    ap.add_argument("--file", action="append", default=[], metavar="NAME=PATH",
                    help="one more variant: attention.cu from PATH (its includes from cuda/)")
    ap.add_argument("--patch", action="append", default=[], metavar="FILE.json",
                    help="one more variant per item of an `e2e --patch` file that edits attention.cu "
                         "(e.g. bench/patches/attn-2026-12-04.json: the kernel before quads)")
    ap.add_argument("--splits", action="store_true", help="the split-count sweep instead")
    ap.add_argument("--batch", type=int, default=1, help="sequences a launch (each of the context's length)")
    ap.add_argument("--heads", default=None, metavar="HQ,HKV,D",
                    help="another attention shape (default 32,32,128: Llama-2-7B), e.g. 8,4,256 (Gemma 3 4B)")
    a = ap.parse_args()
    if a.heads:
        global HQ, HKV, D
        try:
            HQ, HKV, D = (int(x) for x in a.heads.split(","))
        except ValueError:
            raise SystemExit(f"--heads wants HQ,HKV,D, got {a.heads!r}") from None
        if HQ % HKV or D not in (64, 128, 256):
            raise SystemExit(f"--heads {a.heads}: HQ must be a multiple of HKV and D one of 64, 128, 256")
    import cupy as cp
    from engine.gpu import attention, kernels
    contexts = [int(c) for c in a.contexts.split(",")]
    if a.splits:
        run_splits(cp, attention, contexts)
    else:
        if a.batch < 1:
            raise SystemExit(f"--batch must be at least 1, got {a.batch}")
        run_variants(cp, attention, kernels, contexts, a.variants.split(","), a.file, a.batch, a.patch)


if __name__ == "__main__":
    main()
