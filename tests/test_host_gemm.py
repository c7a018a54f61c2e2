"""bench/host_gemm.py: the fake CuPy still carries ops.gemm_a8w4's host path to a launch for
every 7B prefill linear (so the tool measures what the engine runs), and the fakes are undone."""
import sys
from pathlib import Path

from engine.gpu import backend, choice, kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import host_gemm  # noqa: E402


def test_every_linear_reaches_a_launch_and_fakes_are_undone(monkeypatch):
    launched = []

    class Recording(host_gemm._Kernel):
        def __call__(self, grid, block, args, shared_mem=0, cluster=None):
            launched.append((grid, block, len(args), shared_mem))

    monkeypatch.setattr(host_gemm, "_Kernel", Recording)
    before = (backend.cupy_or_none, kernels.function, kernels.device_info, choice.STATE.policy)
    caches = [getattr(obj, name) for obj, name in host_gemm.CACHES]
    snapshot = [dict(c) for c in caches]
    with host_gemm.faked():
        res = host_gemm.time_calls(512, 2)
        assert all(len(getattr(obj, name)) for obj, name in host_gemm.CACHES[:3])    # the fakes filled them
    assert [getattr(obj, name) for obj, name in host_gemm.CACHES] == caches
    assert all(a is b for a, b in zip((getattr(obj, name) for obj, name in host_gemm.CACHES), caches))
    assert [dict(c) for c in caches] == snapshot                     # untouched
    assert set(res) == set(host_gemm.LINEARS_7B) and all(v > 0 for v in res.values())
    assert len(launched) == 3 * len(host_gemm.LINEARS_7B)          # a warm call and two timed, each
    assert all(len(g) == 2 and g[0] >= 1 and nargs > 10 and smem > 0 for g, _, nargs, smem in launched)
    assert (backend.cupy_or_none, kernels.function, kernels.device_info, choice.STATE.policy) == before


def test_main_prints_a_row_per_m(capsys):
    assert host_gemm.main(["--m", "64", "--calls", "2"]) == 0
    out = capsys.readouterr().out
    assert "| 64 |" in out and "policy" in out


def test_plan_scope_launches_what_unplanned_calls_launch(monkeypatch):
    """ops.plan_scope (a prefill pass): a second layer of the same shape, and the same layer
    again, launch the kernel, grid, block, shared memory and arguments an unplanned call does,
    with their own arrays (each call its own activations, scales, outputs and residual); other
    M, the residual GEMV and an explicit kernel are other plans; a hit still refuses a bad
    output; outside the scope nothing is kept."""
    import contextlib
    import numpy as np
    import pytest
    from engine.gpu import kargs, ops
    seen, planned_keys = [], []
    monkeypatch.setattr(kargs, "_WRAP", [lambda expr, run: (seen.append(expr), run())])
    a, b = host_gemm.layer_of(4096, 4096), host_gemm.layer_of(4096, 4096)
    c = host_gemm.layer_of(12288, 4096)
    mine = {id(v) for L in (a, b, c) for v in (L.qw, L.meta, L.s8)}

    def arrays(m, n=4096):
        got = (np.zeros((m, a.k_pad), np.int8), np.ones(m, np.float32), np.empty((m, n), np.float16))
        mine.update(id(v) for v in got)
        return got

    def resid():
        r = np.zeros((8, 4096), np.float32)
        mine.add(id(r))
        return r

    calls = [(L, *arrays(m), None, "auto") for m in (512, 8, 1) for L in (a, b, a)]
    calls += [(L, *arrays(8), resid(), "auto") for L in (a, b, a)]
    calls += [(L, *arrays(512), None, "mma") for L in (a, b)]
    calls += [(c, *arrays(512, 12288), None, "auto")]

    def launches(planned):
        seen.clear()
        got = []

        def record(self, grid, block, args, shared_mem=0, cluster=None):
            got.append((seen[-1], grid, block, shared_mem,             # the workspace: each faked() its own
                        tuple((id(v) if id(v) in mine else "ws") if isinstance(v, np.ndarray) else v for v in args)))
        monkeypatch.setattr(host_gemm._Kernel, "__call__", record)
        with host_gemm.faked():
            with ops.plan_scope() if planned else contextlib.nullcontext():
                for L, x8, sx, out, r, kernel in calls:
                    if r is None:
                        ops.gemm_a8w4(x8, sx, L, kernel=kernel, out=out)
                    else:
                        ops.gemm_a8w4(x8, sx, L, kernel=kernel, resid=r)
                if planned:      # a plan a shape: 4096² at M = 512, 8, 1, 8 with resid, mma; 12288 at 512
                    planned_keys.extend(ops._PLANS[-1])
                    with pytest.raises(ops.CudaOpError, match="out must be"):      # a hit still checks
                        ops.gemm_a8w4(*calls[0][1:3], a, out=np.empty((512, 4095), np.float16))
            assert not ops._PLANS
        return got

    plain, planned = launches(False), launches(True)
    assert len(plain) == len(calls) and planned == plain
    assert len(planned_keys) == 6
    assert len({g[0] for g in plain}) >= 4                       # wgmma, mma, the GEMV and its dp4a form


def test_split_k_launches_a_cluster_where_every_cluster_is_resident(monkeypatch):
    """ops._run_gemm hands the wgmma kernel's K splits to one cluster a tile (grid y = cluster y =
    splits) where launch says clusters are there and all of them fit at once; otherwise the same
    grid without a cluster. The workspace is passed either way (a kernel without the cluster path
    still reduces through it)."""
    import numpy as np
    from engine.gpu import launch, ops
    got = []

    def record(self, grid, block, args, shared_mem=0, cluster=None):
        got.append((grid, cluster, sum(isinstance(v, np.ndarray) for v in args)))
    monkeypatch.setattr(host_gemm._Kernel, "__call__", record)
    L = host_gemm.layer_of(4096, 4096)
    x8, sx, out = np.zeros((64, L.k_pad), np.int8), np.ones(64, np.float32), np.empty((64, 4096), np.float16)
    before = (launch.clusters_available, launch.max_active_clusters)
    with host_gemm.faked():
        with host_gemm.hooked([(launch, "clusters_available", lambda: True),
                               (launch, "max_active_clusters", lambda *a: 10**6)]):
            ops.gemm_a8w4(x8, sx, L, kernel="wgmma", out=out)       # the table: 64/4/1/0/2, K split 8 ways
        with host_gemm.hooked([(launch, "clusters_available", lambda: True),
                               (launch, "max_active_clusters", lambda *a: 1)]):
            ops.gemm_a8w4(x8, sx, L, kernel="wgmma", out=out)
        ops.gemm_a8w4(x8, sx, L, kernel="wgmma", out=out)           # faked(): no clusters at all
    (g1, c1, n1), (g2, c2, n2), (g3, c3, n3) = got
    assert g1[1] > 1 and c1 == (1, g1[1], 1)
    assert g2 == g3 == g1 and c2 is None and c3 is None
    assert n1 == n2 == n3                                            # workspace and counters every time
    assert (launch.clusters_available, launch.max_active_clusters) == before          # hooks undone


def test_gemv_launches_one_block_a_row_tile(monkeypatch):
    """The one-token GEMV (fp16 out, the SiLU GEMV) launches one block a row tile, 16 warps where the
    row tiles are few; nine tokens take two token tiles."""
    import numpy as np
    from engine.gpu import kargs, ops
    launched = []

    class Recording(host_gemm._Kernel):
        def launch_bound(self, grid, block, bound, args, shared_mem=0, cluster=None):
            launched.append((grid, block))

    monkeypatch.setattr(host_gemm, "_Kernel", Recording)
    names = []
    monkeypatch.setattr(kargs, "_WRAP", [lambda expr, run: (names.append(expr), run())])
    qkv, o, gu = host_gemm.layer_of(12288, 4096), host_gemm.layer_of(4096, 4096), host_gemm.layer_of(22016, 4096)

    def call(layer, m=1):
        launched.clear(), names.clear()
        x8, sx = np.zeros((m, layer.k_pad), np.int8), np.ones(m, np.float32)
        ops.gemm_a8w4(x8, sx, layer, kernel="gemv", out=np.empty((m, layer.n), np.float16))
        return names[-1], launched[-1][0]

    with host_gemm.faked():
        assert call(qkv) == ("gemm_a8w4_gemv<1,1,2,false,false,8,true>", (768,))
        launched.clear(), names.clear()
        ops.gemv_a8w4_silu(np.zeros((1, gu.k_pad), np.int8), np.ones(1, np.float32), gu,
                           np.empty((1, gu.n // 2), np.float32), np.zeros(1, np.uint32))
        assert (names[-1], launched[-1][0]) == ("gemm_a8w4_gemv<1,1,2,false,true,8,true>", (1376,))
        assert call(o)[0] == "gemm_a8w4_gemv<1,1,2,false,false,16,true>"      # few row tiles: 16 warps
        assert call(qkv, m=9)[0].startswith("gemm_a8w4_gemv<2,")               # two token tiles


def test_resident_grid_keeps_the_most_row_tiles_a_block(monkeypatch):
    """kargs.resident_grid (gpu/wb.py gemv_grid): one block a row tile where they all fit, else no
    more blocks than are resident (or than the cap) and of those as few as keep the most row tiles a
    block."""
    from engine.gpu import kargs
    with host_gemm.faked():
        monkeypatch.setattr(kargs, "_RESIDENT", {("fn", 256, 0, host_gemm.H200["name"]): 528})  # 4 blocks an SM
        grid = kargs.resident_grid
        assert grid("fn", 500, 256) == 500
        assert grid("fn", 768, 256) == 384            # 768 row tiles on 528 slots: 384 blocks of two
        assert grid("fn", 768, 256, 0, 7) == 7
        assert grid("fn", 768, 256, 0, 1000) == 384   # a cap past the resident blocks changes nothing
        assert grid("fn", 768, 256, 0, 264) == 256    # 264 slots: 256 blocks of three
        assert grid("fn", 1376, 256) == 459           # 3 a block
        assert grid("fn", 1376, 256, 0, 100) == 99    # 14 a block
