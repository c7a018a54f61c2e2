"""A `--patch` file that compiles the kernels of an earlier revision beside today's, in one process.

    python bench/patch_from.py REV [--name NAME] [--ab FIELD=INT,...] [--out FILE.json]

`python -m engine.bench e2e | gemm-tune | gemv-wb --patch FILE.json` times kernels compiled from
edited source beside the landed ones (kargs.patched): the only same-process A/B of a kernel change
on a lent GPU, where machines differ by several per cent. This writes the edits that turn each
cuda/*.cu module's inlined source (headers expanded, as NVRTC compiles it) of the working tree back
into REV's, one patch item named NAME (default `rev-REV`). Each edit's old text occurs exactly once
in today's inlined module, and applying them gives REV's module exactly (checked before writing).
Only modules whose kernels keep their names and parameters can be patched (kargs.check_edits
refuses the rest). `--ab` adds settings the old kernels need (a patch item's "ab"), e.g.
`wgmma_cluster_max=0` for a kernel from before the cluster reduce.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

from engine.gpu import kargs, kernels

CONTEXT = 1                 # lines kept around each hunk (more where the old text would not be unique)
MERGE = 4                   # hunks closer than this many lines become one edit


@contextlib.contextmanager
def cuda_dir(path: Path):
    """Within the block kernels.source reads cuda/ sources from `path`."""
    saved = kernels.CUDA_DIR
    kernels.CUDA_DIR = Path(path)
    try:
        yield
    finally:
        kernels.CUDA_DIR = saved


def inlined(path: Path) -> dict[str, str]:
    """module name -> its inlined source, for every .cu in `path`."""
    with cuda_dir(path):
        return {p.name: kernels.source(p.name) for p in sorted(Path(path).glob("*.cu"))}


def module_edits(name: str, new: str, old: str) -> list[list[str]]:
    """[name, old text, new text] edits that turn `new` (today's inlined module) into `old`."""
    a, b = new.splitlines(keepends=True), old.splitlines(keepends=True)
    hunks = [h for h in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes() if h[0] != "equal"]
    groups: list[list] = []
    for h in hunks:
        if groups and h[1] - groups[-1][-1][2] < MERGE:
            groups[-1].append(h)
        else:
            groups.append([h])
    edits = []
    for g in groups:
        i1, i2, j1, j2 = g[0][1], g[-1][2], g[0][3], g[-1][4]
        ctx = CONTEXT
        while True:
            c1, c2 = max(0, i1 - ctx), min(len(a), i2 + ctx)
            before = "".join(a[c1:c2])
            if before and new.count(before) == 1:
                break
            if c1 == 0 and c2 == len(a):
                raise ValueError(f"{name}: a change whose text is not unique even in the whole module")
            ctx += 1
        edits.append([name, before, "".join(a[c1:i1]) + "".join(b[j1:j2]) + "".join(a[i2:c2])])
    return edits


def patch_between(new_dir: Path, old_dir: Path, name: str, ab: str | None = None) -> dict:
    """The patch item that turns the modules of new_dir into old_dir's (modules only in one of
    them are refused: a launch could not find its kernel)."""
    new, old = inlined(new_dir), inlined(old_dir)
    if set(new) != set(old):
        raise ValueError(f"the two trees hold different modules: {sorted(set(new) ^ set(old))}")
    edits = []
    for mod in new:
        if new[mod] != old[mod]:
            mine = module_edits(mod, new[mod], old[mod])
            got = new[mod]
            for _, before, after in mine:      # as kernels.apply_edits will, one at a time
                got = got.replace(before, after)
            if got != old[mod]:
                raise ValueError(f"{mod}: the edits do not rebuild the old module (overlapping changes)")
            edits += mine
    if not edits:
        raise ValueError("no cuda/*.cu module differs: nothing to patch")
    item = {"name": name, "edits": edits}
    if ab:
        item["ab"] = ab
    return item


def rev_cuda(rev: str, dest: Path) -> Path:
    """cuda/ of git revision `rev` extracted under dest."""
    try:
        data = subprocess.run(["git", "archive", rev, "cuda"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise ValueError(f"cannot read cuda/ at {rev!r} with git archive: {getattr(e, 'stderr', b'').decode().strip() or e}") from None
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        try:
            tar.extractall(dest, filter="data")
        except TypeError:                      # a Python without extraction filters (before 3.11.4)
            tar.extractall(dest)
    return dest / "cuda"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rev")
    ap.add_argument("--name", default=None)
    ap.add_argument("--ab", default=None, help="settings the old kernels need, FIELD=INT,... (as --ab)")
    ap.add_argument("--out", default=None, help="write here (atomically) instead of stdout")
    a = ap.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            item = patch_between(kernels.CUDA_DIR, rev_cuda(a.rev, Path(tmp)), a.name or f"rev-{a.rev}", a.ab)
        kargs.check_edits(item["edits"])
    except ValueError as e:
        print(f"patch_from: {e}", file=sys.stderr)
        return 2
    text = json.dumps([item], indent=1) + "\n"
    if a.out is None:
        sys.stdout.write(text)
    else:
        out = Path(a.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)
        print(f"{len(item['edits'])} edits -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
