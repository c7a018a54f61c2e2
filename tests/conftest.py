"""DGQ_TEST_PATCH=FILE.json:NAME: the whole test session compiles its kernels from the edited source
of one item of a `--patch` file (kargs.patched, as `python -m engine.bench e2e --patch` does), so a
prepared kernel variant meets the GPU tests before it lands, e.g. on a lent GPU:

    DGQ_TEST_PATCH=bench/patches/attn-2026-12-04.json:attn-2026-12-04 python -m pytest -m gpu tests/test_decode_attention_gpu.py

Unset (always, in CI), nothing changes."""
from __future__ import annotations

import os

import pytest


def session_patch() -> tuple:
    """The (file, old, new) edits DGQ_TEST_PATCH names, () when it is unset; a usage error for a
    bad value, before any test runs."""
    spec = os.environ.get("DGQ_TEST_PATCH", "")
    if not spec:
        return ()
    from engine.bench.e2e import read_patch_item  # noqa: PLC0415
    try:
        _name, edits, ab = read_patch_item(spec)
    except ValueError as e:
        raise pytest.UsageError(f"DGQ_TEST_PATCH={spec}: {e}") from None
    if ab:
        raise pytest.UsageError(f"DGQ_TEST_PATCH={spec}: the item sets tuning fields too ({ab}); "
                                "only source edits can run under the tests")
    return edits


def pytest_configure(config):
    config.dgq_patch = session_patch()


@pytest.fixture(scope="session", autouse=True)
def _dgq_test_patch(request):
    edits = request.config.dgq_patch
    if not edits:
        yield
        return
    from engine.gpu import kargs  # noqa: PLC0415
    with kargs.patched(edits):
        yield
