"""The machine code of every kernel the engine compiles, read without a GPU.

    python bench/sass_scan.py [--match REGEX] [--arch sm_90a] [--dump REGEX --out DIR] [--json]
                              [--patch FILE.json:NAME]

Each .cu file of the engine is expanded as engine/gpu/kernels.py expands it, every template
instantiation the engine launches (the KernelFile lists of gpu/wb.py, fused.py, attention.py,
ops.py and pot_a8.py) is made concrete by taking its address, nvcc compiles the lot to a cubin for `--arch`,
and nvdisasm lists the SASS. A row a kernel: its instructions, registers, spilled bytes, integer
divisions (the I2F.RP … MUFU.RCP … F2I sequence a 32-bit `/` or `%` by a runtime value becomes,
~20 dependent instructions) and how many of those sit inside a loop (between a backward branch
and its target), and the instructions of its longest innermost loop (a hot loop's body, e.g.
a decode attention key step); a kernel whose wgmmas ptxas serialized (warning C7513: one in
flight whatever its waits ask, a large loss) is flagged. `--dump` writes the SASS of the matching kernels to DIR for reading.
`--patch FILE.json:NAME` compiles the sources with one item of an `e2e --patch` file applied
(bench/patches/), so a prepared variant's counts stand beside today's (run both).

Why: a session has minutes of GPU time, and Nsight Compute on the device is the only other way to
see what a kernel executes. The weight-only GEMV's item loop divided by a runtime count twice an
item and carried its group size as a runtime value (docs/KERNELS.md, "Where the instructions
went"); both show here as divisions in a loop and as the instruction count. What this cannot see:
how often each instruction runs, stalls, and NVRTC's choices where they differ from nvcc's (the
engine compiles with NVRTC on the device); the counts are static.

Needs nvcc and nvdisasm on PATH or beside nvcc (the CUDA toolkit; nvdisasm alone also ships as
the PyPI wheel nvidia-cuda-nvdisasm: `--nvdisasm PATH`), and c++filt for readable names.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from engine.gpu import attention, fused, kargs, kernels, ops, pot_a8, wb

MODULES = (wb, fused, attention, ops, pot_a8)
_FN_RE = re.compile(r"^\s*\.text\.([^:\s]+):\s*$", re.M)
_INS_RE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", re.M)
_LABEL_RE = re.compile(r"^\s*(\.L_x_\d+):\s*$")
# ptxas's note that it serialized a kernel's wgmmas (one in flight, whatever the code's waits say)
_SERIAL_RE = re.compile(r"\(C7513\)[^\n]*?in the function '([^']+)'")
_PTXAS_RE = re.compile(r"Compiling entry function '([^']+)'.*?(\d+) bytes spill stores, (\d+) bytes spill loads"
                       r".*?Used (\d+) registers", re.S)


def kernel_files() -> dict[str, list[str]]:
    """cuda file -> the instantiations the engine launches from it (sorted, unique)."""
    files: dict[str, set] = {}
    for mod in MODULES:
        for v in vars(mod).values():
            if isinstance(v, kargs.KernelFile):
                files.setdefault(v.file, set()).update(v.exprs)
    return {f: sorted(e) for f, e in sorted(files.items()) if e}


def instantiation_source(file: str, exprs: list[str], edits=()) -> str:
    """The file's expanded text (with the source edits of a patch item applied) plus one host-side
    address a kernel, which makes nvcc emit each."""
    lines = [f"void* __dgq_inst_{i} = (void*)&{e};" for i, e in enumerate(exprs)]
    code = kernels.apply_edits(file, kernels.source(file), edits)
    return code + "\n// ---- instantiations (bench/sass_scan.py)\n" + "\n".join(lines) + "\n"


def parse_sass(text: str) -> dict[str, list[tuple[int, str]]]:
    """nvdisasm -c output -> {mangled kernel name: [(address, instruction), ...]}, labels as ("", label)."""
    out: dict[str, list] = {}
    parts = _FN_RE.split(text)
    for name, body in zip(parts[1::2], parts[2::2]):
        rows = []
        for line in body.split("\n"):
            lm = _LABEL_RE.match(line)
            if lm:
                rows.append((-1, lm.group(1)))
                continue
            m = _INS_RE.match(line)
            if m:
                rows.append((int(m.group(1), 16), m.group(2)))
        out[name] = rows
    return out


def loops(rows: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(first, last) instruction addresses of each loop: a branch back to a label before it."""
    labels, pending = {}, []
    for a, t in rows:                      # a label names the address of the next instruction
        if a < 0:
            pending.append(t)
        elif pending:
            labels.update({p: a for p in pending})
            pending = []
    out = []
    for a, t in rows:
        m = re.search(r"\bBRA\b.*?`\((\.L_x_\d+)\)", t) if a >= 0 else None
        if m and labels.get(m.group(1), a + 1) < a:
            out.append((labels[m.group(1)], a))
    return out


def longest_inner_loop(rows: list[tuple[int, str]]) -> int:
    """Instructions of the longest loop that holds no other loop (0: none)."""
    ls = loops(rows)
    inner = [(s, e) for s, e in ls if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in ls)]
    addrs = [a for a, _ in rows if a >= 0]
    return max((sum(s <= a <= e for a in addrs) for s, e in inner), default=0)


def divisions(rows: list[tuple[int, str]]) -> tuple[int, int]:
    """(integer divisions, those inside a loop) of one kernel's SASS."""
    ins = [(a, t) for a, t in rows if a >= 0]
    loops_ = loops(rows)
    divs = []
    for i, (a, t) in enumerate(ins):
        m = re.search(r"\bMUFU\.RCP\s+R\d+,\s*(R\d+)", t)        # the reciprocal of an I2F.RP's result
        if m and any(re.search(rf"\bI2F\S*\.RP\s+{m.group(1)},", u) for _, u in ins[max(0, i - 8):i]):
            divs.append(a)
    return len(divs), sum(any(s <= d <= e for s, e in loops_) for d in divs)


def patch_edits(spec: str) -> tuple:
    """The source edits of item NAME of an `e2e --patch` FILE.json ("FILE.json:NAME"), checked."""
    from engine.bench.e2e import read_patch_item  # noqa: PLC0415
    try:
        return read_patch_item(spec)[1]
    except ValueError as e:
        sys.exit(f"sass_scan: --patch {e}")


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    res = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    outs = res.stdout.split("\n")
    return {n: (outs[i] if i < len(outs) and outs[i] else n) for i, n in enumerate(names)}


def find_nvdisasm(given: str | None) -> str:
    cands = [given] if given else [shutil.which("nvdisasm")]
    nvcc = shutil.which("nvcc")
    if not given and nvcc:
        cands.append(str(Path(nvcc).resolve().parent / "nvdisasm"))
    for c in cands:
        if c and Path(c).is_file():
            return c
    sys.exit("sass_scan: nvdisasm not found (the CUDA toolkit's, or `pip download nvidia-cuda-nvdisasm` "
             "and --nvdisasm .../nvidia/cu13/bin/nvdisasm)")


def scan(files: dict[str, list[str]], arch: str, nvdisasm: str, work: Path, edits=()) -> list[dict]:
    nvcc = shutil.which("nvcc")
    if not nvcc:
        sys.exit("sass_scan: nvcc not found on PATH")
    rows = []
    for file, exprs in files.items():
        cu = work / file
        cu.write_text(instantiation_source(file, exprs, edits))
        cubin = work / (file + ".cubin")
        res = subprocess.run([nvcc, f"-arch={arch}", "-std=c++17", "-cubin", "-Xptxas", "-v", "-o", str(cubin), str(cu)],
                             capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"sass_scan: nvcc failed on {file}:\n{res.stderr[-2000:]}")
        ptxas = {m.group(1): (int(m.group(4)), int(m.group(2)), int(m.group(3))) for m in _PTXAS_RE.finditer(res.stderr)}
        serial = set(_SERIAL_RE.findall(res.stderr))
        sass = parse_sass(subprocess.run([nvdisasm, "-c", str(cubin)], capture_output=True, text=True, check=True).stdout)
        for name, body in sass.items():
            regs, st, ld = ptxas.get(name, (None, None, None))
            nd, nl = divisions(body)
            rows.append(dict(file=file, kernel=name, instructions=sum(a >= 0 for a, _ in body), registers=regs,
                             spill_stores=st, spill_loads=ld, divisions=nd, divisions_in_loops=nl,
                             longest_loop=longest_inner_loop(body), wgmma_serialized=name in serial, sass=body))
    names = demangle([r["kernel"] for r in rows])
    for r in rows:
        r["name"] = names[r["kernel"]]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--match", default="", help="only kernels whose readable name matches this regex")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--nvdisasm", default=None, help="path of nvdisasm when it is not beside nvcc")
    ap.add_argument("--dump", default=None, help="write the SASS of kernels matching this regex to --out")
    ap.add_argument("--out", default="sass_dump")
    ap.add_argument("--json", action="store_true", help="one JSON object a kernel (without the SASS)")
    ap.add_argument("--patch", default=None, metavar="FILE.json:NAME",
                    help="compile with this item of an `e2e --patch` file applied (bench/patches/)")
    a = ap.parse_args(argv)
    edits = patch_edits(a.patch) if a.patch else ()
    nvdisasm = find_nvdisasm(a.nvdisasm)
    # compile only the files with a matching instantiation (written as c++filt writes it: ", ")
    files = {f: e for f, e in kernel_files().items()
             if any(re.search(a.match, re.sub(r",\s*", ", ", x)) for x in e)}
    with tempfile.TemporaryDirectory() as tmp:
        rows = scan(files, a.arch, nvdisasm, Path(tmp), edits)
    rows = [r for r in rows if re.search(a.match, r["name"])]
    if a.dump:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        for i, r in enumerate(x for x in rows if re.search(a.dump, x["name"])):
            text = "\n".join(f"{t}:" if addr < 0 else f"/*{addr:05x}*/ {t}" for addr, t in r["sass"])
            (out / f"{i:03d}.sass").write_text(f"// {r['name']}\n{text}\n")
    for r in rows:
        r.pop("sass")
    if a.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print("| kernel | instructions | longest inner loop | registers | spilled bytes (st/ld) | divisions (in loops) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        short = re.sub(r"^void ", "", r["name"].split("(")[0])
        flag = " **wgmma serialized (C7513)**" if r["wgmma_serialized"] else ""
        print(f"| `{short}`{flag} | {r['instructions']} | {r['longest_loop']} | {r['registers']} "
              f"| {r['spill_stores']}/{r['spill_loads']} | {r['divisions']} ({r['divisions_in_loops']}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
