"""Fuzz the input boundary: hundreds of damaged files and bad flags (tests/fuzz_inputs.py), each
through a dgq-* command in-process (click's CliRunner) or engine.api.load_model.

Every case must end in one clear refusal:
  - a command exits non-zero through click's error path (no uncaught exception), prints no
    traceback and no "internal error" (dgq_cli's marker for an error no check caught), and its
    error is one line;
  - load_model raises WeightsError (every loader's one exception type) with a one-line message;
  - nothing hangs (a per-case timer), nothing loads (no silent success), and the case's
    directory holds exactly what it held before (no temp files, no half-written output).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import dgq_cli
from engine.api import load_model
from engine.io.layout import WeightsError
from fuzz_inputs import all_cases, make_base

CASE_TIMEOUT_S = 20
LAST = [""]          # the last case's message, for FUZZ_LOG=file (a reading aid)
COMMANDS = {"run": dgq_cli.run, "eval": dgq_cli.eval_cmd, "quantize": dgq_cli.quantize, "export": dgq_cli.export}


class Hang(BaseException):
    """Raised by the per-case timer; a BaseException so no `except Exception` can swallow it."""


def _on_alarm(signum, frame):
    raise Hang()


def snapshot(root: Path) -> dict:
    """Every entry under root (hidden ones included, links not followed): kind, size, mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mode, 0 if os.path.isdir(p) else st.st_size, st.st_mtime_ns)
    return out


def check_case(case, work: Path, base) -> str | None:
    """Run one case; None when it was refused properly, else what went wrong."""
    work.mkdir()
    invocation = case.build(work, base)
    before, base_before = snapshot(work), None
    kind, arg = invocation
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT_S)
    try:
        if kind == "api":
            try:
                load_model(arg, device="cpu")
                problem = "load_model succeeded on a damaged input"
            except WeightsError as e:
                msg = LAST[0] = str(e)
                problem = None if msg and "\n" not in msg else f"message not one line: {msg!r}"
            except Exception as e:  # noqa: BLE001
                problem = f"load_model raised {type(e).__name__} (not WeightsError): {e}"
        else:
            r = CliRunner().invoke(COMMANDS[kind], arg, env={"DGQ_DEBUG": ""})
            out = LAST[0] = r.output
            if r.exit_code == 0:
                problem = f"exit 0 (silent success); output {out[-300:]!r}"
            elif r.exception is not None and not isinstance(r.exception, SystemExit):
                problem = f"uncaught {type(r.exception).__name__}: {r.exception}"
            elif "Traceback" in out or "internal error" in out:
                problem = f"traceback or internal error: {out[-500:]!r}"
            else:
                errors = [ln for ln in out.splitlines() if ln.startswith("Error")]
                problem = None if len(errors) == 1 else f"expected one error line: {out[-500:]!r}"
    except Hang:
        problem = f"hung for more than {CASE_TIMEOUT_S} s"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    after = snapshot(work)
    if problem is None and after != before:
        added = sorted(set(after) - set(before))
        changed = sorted(k for k in before if after.get(k) != before[k])
        problem = f"files changed: added {added}, changed {changed}"
    del base_before
    return problem


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("fuzz-base"))


def test_fuzz_inputs(base, tmp_path):
    cases = all_cases()
    assert len(cases) >= 300, len(cases)
    base_before = snapshot(base.root)
    failures, t0 = [], time.perf_counter()
    for i, case in enumerate(cases):
        problem = check_case(case, tmp_path / f"c{i:04d}", base)
        if problem:
            failures.append(f"{case.name}: {problem}")
        if os.environ.get("FUZZ_LOG"):
            with open(os.environ["FUZZ_LOG"], "a", encoding="utf-8") as log:
                log.write(f"{case.name}\t{' | '.join(LAST[0].strip().splitlines())}\n")
    dt = time.perf_counter() - t0
    assert snapshot(base.root) == base_before, "a case modified the shared valid inputs"
    print(f"\n{len(cases)} damaged inputs in {dt:.1f} s, {len(failures)} failures")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)
