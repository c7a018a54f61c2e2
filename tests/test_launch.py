"""Launch-time rules of the GPU engine that need no GPU: row-kernel block shapes and the
sampling kernel's packed settings (cuda/rows.cuh, cuda/sample.cu)."""
import numpy as np
import pytest

from engine.gpu import ops as ops_cuda
from engine.gpu.fused import FUSED_EXPRS, row_cluster, row_launch
from engine.gpu.tuning import ROW_VARIANTS
from engine.gpu.backend import BackendError
from engine.model.sampling import SamplingError


ROW_PERS, ROW_CLUSTERS, ROW_CLUSTER_PERS = ROW_VARIANTS.pers, ROW_VARIANTS.clusters, ROW_VARIANTS.cluster_pers


def test_row_launch_covers_every_width_with_whole_warps():
    for width in range(1, ROW_PERS[-1] * 1024 + 1):
        for cl in ROW_CLUSTERS:
            if cl > 1 and width > ROW_CLUSTER_PERS[-1] * 1024 * cl:
                continue
            expr, threads = row_launch("add_rmsnorm_quant", width, cl)
            assert expr in FUSED_EXPRS                          # an instantiated kernel
            per, ecl, vec = (int(v) for v in expr[expr.index("<") + 1:-1].split(","))
            assert vec == 1                                     # element-strided unless asked
            share = -(-width // cl)                             # a CTA's part of the row
            assert ecl == cl and threads % 32 == 0 and 32 <= threads <= 1024
            assert per * threads * cl >= width                  # every element has a slot
            assert per * (threads - 32) < share                 # no warp is left without an element
            assert per == 1 or (per // 2) * 1024 < share        # the smallest PER that fits
    with pytest.raises(BackendError, match="rows of up to"):
        row_launch("silu_mul_quant", ROW_PERS[-1] * 1024 + 1)
    with pytest.raises(BackendError, match="rows of up to"):
        row_launch("silu_mul_quant", ROW_CLUSTER_PERS[-1] * 1024 * 2 + 1, 2)
    with pytest.raises(BackendError, match="clusters"):
        row_launch("silu_mul_quant", 4096, 3)


def test_row_launch_wide_accesses():
    """vec: chunks of min(PER, 8) elements where PER ≥ 4 and the chunk divides the width, one
    CTA a row only; the same PER and block size as without."""
    for width in range(1, 20001, 7):
        for cap in (1024, 256):
            expr, threads = row_launch("silu_mul_quant", width, 1, cap, vec=True)
            plain, pthreads = row_launch("silu_mul_quant", width, 1, cap)
            assert expr in FUSED_EXPRS and threads == pthreads
            per, _, vec = (int(v) for v in expr[expr.index("<") + 1:-1].split(","))
            assert plain == f"silu_mul_quant<{per}, 1, 1>"
            want = min(per, 8) if per >= 4 else 1
            assert vec == (want if width % want == 0 else 1)
    assert row_launch("quant_rows", 11008, 1, 256, vec=True) == ("quant_rows<16, 1, 8>", 704)
    # the prefill widths of the models we run: 7B 4096 / 11008, SmolLM2 576 / 1536
    assert row_launch("add_rmsnorm_quant", 4096, 1, 256, vec=True) == ("add_rmsnorm_quant<16, 1, 8>", 256)
    assert row_launch("add_rmsnorm_quant", 576, 1, 256, vec=True) == ("add_rmsnorm_quant<4, 1, 4>", 160)
    assert row_launch("silu_mul_quant", 1536, 1, 256, vec=True) == ("silu_mul_quant<8, 1, 8>", 192)
    assert row_launch("silu_mul_quant", 4100, 1, 256, vec=True)[0] == "silu_mul_quant<32, 1, 1>"  # ROWS.act_per
    assert row_launch("quant_rows", 4100, 1, 256, vec=True)[0] == "quant_rows<8, 1, 1>"            # the rule
    assert row_launch("quant_rows", 4096, 2, 1024, vec=True)[0] == "quant_rows<2, 2, 1>"   # clusters: 1


def test_row_cluster_keeps_each_cta_within_its_width():
    assert [row_cluster(w, 2048) for w in (576, 2048, 2049, 4096, 8192, 11008, 16384, 40000)] == \
        [1, 1, 2, 2, 4, 8, 8, 8]
    assert row_cluster(11008, 4096) == 4 and row_cluster(11008, 1 << 20) == 1


def test_sample_params_pack_and_validate():
    p = ops_cuda.sample_params(0.8, 50, 0.9, seed=-1)
    assert p.dtype == np.uint32 and p.shape == (5,)
    assert p[:2].view(np.float32).tolist() == pytest.approx([0.8, 0.9])
    assert p[2] == 50 and p[3] == p[4] == 0xFFFFFFFF       # the seed's 64 bits, two's complement
    assert ops_cuda.sample_params(seed=2**40 + 5)[3:].tolist() == [5, 2**8]
    for bad in (dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_k=-1),
                dict(top_p=0.0), dict(top_p=float("nan"))):
        with pytest.raises(SamplingError):
            ops_cuda.sample_params(**bad)
    with pytest.raises(ops_cuda.CudaOpError, match="seed"):
        ops_cuda.sample_params(seed=None)


def test_kernel_launch_marshalling_without_a_gpu():
    """engine/gpu/launch.py packs arguments as the driver reads them: pointers for arrays,
    a scalar's own bytes, null for None; bad grids and argument types are one clear error."""
    from engine.gpu import launch

    class FakeArray:                 # stands in for cupy.ndarray
        class data:
            ptr = 0xDEADBEEF000

    class FakeCp:
        ndarray = FakeArray

    import ctypes
    assert launch._arg(FakeArray(), FakeCp).value == 0xDEADBEEF000
    assert launch._arg(None, FakeCp).value is None
    for v in (np.int32(-7), np.float32(0.1), np.uint64(2**63 + 5), np.int64(-1)):
        assert bytes(launch._arg(v, FakeCp)) == v.tobytes()
    assert ctypes.sizeof(launch._Attr) == 72 and ctypes.sizeof(launch._Config) == 56  # cuda.h layouts
    assert launch._Attr.value.offset == 8
    assert (launch._Config.stream.offset, launch._Config.attrs.offset, launch._Config.num_attrs.offset) == \
        (32, 40, 48)
    with pytest.raises(BackendError, match="NumPy scalars"):
        launch._arg(3, FakeCp)                 # a Python int has no C type: the launchers pass np.int32
    assert launch._dims((4, 2), "grid") == (4, 2, 1) and launch._dims(7, "block") == (7, 1, 1)
    for bad in ((), (0,), (1, 1, 1, 1)):
        with pytest.raises(BackendError, match="grid"):
            launch._dims(bad, "grid")


def test_wgmma_split_cluster_policy(monkeypatch):
    """ops._split_cluster: a tile's K splits sum in a cluster only for 2..GEMM.wgmma_cluster_max (≤ 8)
    splits without a split tail, where clusters launch at all, on the tiles compiled with the
    cluster code, and where every tile's cluster is resident at once (max_active_clusters)."""
    from engine.gpu import launch, ops
    monkeypatch.setattr(launch, "clusters_available", lambda: True)
    resident = {}
    monkeypatch.setattr(launch, "max_active_clusters", lambda fn, threads, smem, cl: resident[cl[1]])
    resident.update({2: 132, 4: 62, 8: 30})
    assert ops._split_cluster(2, 1) == (1, 2, 1) and ops._split_cluster(8, 1) == (1, 8, 1)
    assert ops._split_cluster(1, 1) is None and ops._split_cluster(9, 1) is None
    assert ops._split_cluster(2, 3) is None                                 # a split tail: the workspace
    assert ops._split_cluster(2, 1, "fn", 256, 99 << 10, 132, 100) is None  # tiles from 100 on: a tail
    assert ops._split_cluster(2, 1, "fn", 256, 99 << 10, 132) == (1, 2, 1)  # 132 clusters, all resident
    assert ops._split_cluster(4, 1, "fn", 256, 99 << 10, 64) is None        # 64 tiles, 62 resident
    assert ops._split_cluster(8, 1, "fn", 256, 99 << 10, 30) == (1, 8, 1)
    monkeypatch.setattr(ops.GEMM, "wgmma_cluster_max", 4)
    assert ops._split_cluster(4, 1) == (1, 4, 1) and ops._split_cluster(5, 1) is None
    monkeypatch.setattr(ops.GEMM, "wgmma_cluster_max", 0)
    assert ops._split_cluster(2, 1) is None
    monkeypatch.setattr(ops.GEMM, "wgmma_cluster_max", 8)
    monkeypatch.setattr(launch, "clusters_available", lambda: False)
    assert ops._split_cluster(2, 1) is None
    assert [ops.wgmma_cluster_tile(*t) for t in ((32, 2, 0), (64, 1, 0), (64, 2, 0), (128, 2, 0),
                                                 (128, 1, 0), (256, 2, 0), (64, 1, 2))] == \
        [True, True, True, True, False, False, False]
    # the host's rule is the kernel's: WgmmaCluster's expression in cuda/gemm_a8w4_sm90.cu, read
    # and evaluated for every instantiated tile (a kernel without the cluster path launched as a
    # cluster would leave its partials unsummed)
    import re
    from engine.gpu import kernels, tuning
    m = re.search(r"struct WgmmaCluster \{ static constexpr bool value = ([^;]+); \};",
                  kernels.source("gemm_a8w4_sm90.cu"))
    expr = m.group(1).replace("&&", " and ").replace("||", " or ")
    for bt, st, nwg, wpf, ovl in tuning.WGMMA_CFGS:
        assert eval(expr, {}, {"BT": bt, "NWG": nwg, "WPF": wpf}) == ops.wgmma_cluster_tile(bt, nwg, wpf), \
            (bt, nwg, wpf)
    a = launch._attr(launch.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, (1, 6, 1))
    assert (a.id, tuple(a.value)) == (4, (1, 6, 1))


def test_driver_functions_are_found_once_and_only_on_sm90(monkeypatch):
    """launch._driver_fn: libcuda's entry points with their argument types, looked up once; None
    without CuPy, below sm_90, or where the driver lacks the function (plain launches then)."""
    import ctypes
    from types import SimpleNamespace
    from engine.gpu import launch
    opened = []

    class Lib:
        cuLaunchKernelEx = SimpleNamespace()

    def cdll(name):
        opened.append(name)
        return Lib()
    monkeypatch.setattr(launch, "_STATE", {})
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    cc = ["90"]
    monkeypatch.setattr(launch, "cupy_or_none", lambda: SimpleNamespace(cuda=SimpleNamespace(
        Device=lambda: SimpleNamespace(compute_capability=cc[0]))))
    fn = launch._launch_ex()
    assert fn is Lib.cuLaunchKernelEx and fn.restype is ctypes.c_int and len(fn.argtypes) == 4
    assert launch._launch_ex() is fn and opened == ["libcuda.so.1"]          # cached
    assert launch._driver_fn("cuOccupancyMaxActiveClusters", []) is None      # not in this driver
    assert launch.clusters_available()
    monkeypatch.setattr(launch, "_STATE", {})
    cc[0] = "89"
    assert launch._launch_ex() is None and not launch.clusters_available()
    monkeypatch.setattr(launch, "_STATE", {})
    monkeypatch.setattr(launch, "cupy_or_none", lambda: None)
    assert launch._launch_ex() is None


def test_decode_cluster_policy():
    from engine.gpu.attention import decode_cluster
    from engine.gpu.tuning import ATTENTION
    assert [decode_cluster(n) for n in (1, 2, 3, 4, 5, 8, 9, 64)] == [1, 2, 4, 4, 8, 8, 0, 0]
    assert decode_cluster(4, heads=32, sms=132) == 4          # batch 1 of 32 heads: one wave
    assert decode_cluster(4, heads=256, sms=132) == 0         # batch 8: the merge through memory
    assert set(decode_cluster(n) for n in range(1, 9)) == set(ATTENTION.decode_clusters)


def test_is_capturing_follows_the_capture_context():
    """gemv_wb reads it to keep cuBLAS out of a captured decode step."""
    from engine.gpu import launch
    assert not launch.is_capturing()
    with launch.capturing():
        assert launch.is_capturing()
        with launch.capturing():
            assert launch.is_capturing()
        assert launch.is_capturing()
    assert not launch.is_capturing()


def test_act_per_widens_only_the_activation_rows_of_wide_prefill_rows(monkeypatch):
    """ROWS.act_per: silu/gelu_mul_quant rows past per_many · threads_many (the 7B's 11008) take
    that PER in many-row launches; narrower rows, other kernels, decode launches (cap 1024) and
    a PER whose threads would pass 1024 keep the rule."""
    from engine.gpu import fused, tuning
    monkeypatch.setattr(fused, "_ROW_LAUNCHES", {})
    monkeypatch.setattr(tuning.ROWS, "act_per", 0)                    # the rule
    assert row_launch("silu_mul_quant", 11008, 1, 256, vec=True) == ("silu_mul_quant<16, 1, 8>", 704)
    monkeypatch.setattr(tuning.ROWS, "act_per", 32)
    assert row_launch("silu_mul_quant", 11008, 1, 256, vec=True) == ("silu_mul_quant<32, 1, 8>", 352)
    assert row_launch("gelu_mul_quant", 14336, 1, 256, vec=True) == ("gelu_mul_quant<32, 1, 8>", 448)
    assert row_launch("silu_mul_quant", 1536, 1, 256, vec=True) == ("silu_mul_quant<8, 1, 8>", 192)
    assert row_launch("quant_rows", 11008, 1, 256, vec=True) == ("quant_rows<16, 1, 8>", 704)
    assert row_launch("silu_mul_quant", 11008, 1, 1024)[0] == "silu_mul_quant<16, 1, 1>"
    monkeypatch.setattr(tuning.ROWS, "act_per", 8)                   # 1376 threads: the rule
    assert row_launch("silu_mul_quant", 11008, 1, 256, vec=True) == ("silu_mul_quant<16, 1, 8>", 704)
    monkeypatch.setattr(tuning.ROWS, "act_per", 32)
    assert fused._row_launch("silu_mul_quant", 11008, 1, 256, True)[0] == "silu_mul_quant<32, 1, 8>"
    monkeypatch.setattr(tuning.ROWS, "act_per", 0)
    assert fused._row_launch("silu_mul_quant", 11008, 1, 256, True)[0] == "silu_mul_quant<16, 1, 8>"


def test_param_layout_offsets_and_bytes():
    """launch.ParamLayout lays parameters out as the CUDA ABI does (each at a multiple of its
    size) and packs pointers as 8-byte integers and scalars by their C type."""
    import struct

    from engine.gpu import launch
    lay = launch.ParamLayout(("ptr", "int", "ptr", "float", "long long", "int", "double", "unsigned"))
    assert lay.offsets == (0, 8, 16, 24, 32, 40, 48, 56) and lay.size == 60
    lay.pack([0x7F00DEAD0000, -3, 0, 0.5, -(1 << 40), np.int32(7), 2.25, np.uint32(4000000000)])
    want = struct.pack("<QiiQfiqiidI", 0x7F00DEAD0000, -3, 0, 0, 0.5, 0, -(1 << 40), 7, 0, 2.25, 4000000000)
    assert lay.packed() == want
    assert launch.ParamLayout(("int", "int", "ptr")).offsets == (0, 4, 8)
    import ctypes
    extra = [v or 0 for v in lay.extra]
    assert extra[0] == launch.CU_LAUNCH_PARAM_BUFFER_POINTER and extra[2] == launch.CU_LAUNCH_PARAM_BUFFER_SIZE
    assert extra[4] == launch.CU_LAUNCH_PARAM_END
    assert ctypes.string_at(extra[1], lay.size) == want and ctypes.c_size_t.from_address(extra[3]).value == 60
    with pytest.raises(struct.error):
        lay.pack([0, 1.5, 0, 0.5, 0, 0, 0.0, 0])                # a float for an int: launch_bound falls back


def test_launch_bound_packs_eager_launches_and_falls_back(monkeypatch):
    """Kernel.launch_bound: an eager keyword launch is one cuLaunchKernel with the packed buffer
    (kargs' Bound for the call site); captures (PDL), clusters, DGQ_PACKED=0 / unpacked_launches(),
    a layout the driver lays out otherwise (asked once a kernel), values the buffer cannot hold,
    sizes past the launch limits and a launch the driver refuses go through CuPy's launch with the
    NumPy-scalar tuple, as before."""
    import struct
    from types import SimpleNamespace

    from engine.gpu import kargs, launch
    calls, plain = [], []

    def cu_launch(fptr, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        calls.append((fptr, (gx, gy, gz), (bx, by, bz), smem, stream, params, extra))
        return 0
    stream = SimpleNamespace(ptr=0x5151)
    cp = SimpleNamespace(cuda=SimpleNamespace(runtime=SimpleNamespace(getDevice=lambda: 0),
                                              get_current_stream=lambda: stream))
    monkeypatch.setattr(launch, "cupy_or_none", lambda: cp)
    monkeypatch.setattr(launch, "_cu_launch", lambda: cu_launch)
    same, asked = [True], []
    monkeypatch.setattr(launch, "layout_matches", lambda fptr, layout: asked.append(fptr) or same[0])
    monkeypatch.setattr(launch, "_STATE", {"packed": True})

    class Raw:
        kernel = SimpleNamespace(ptr=0xF00)
        name = "quant_amax<__half>"

        def __call__(self, grid, block, args, shared_mem=0):
            plain.append((grid, block, args, shared_mem))

    class Arr:
        def __init__(self, p):
            self.data = SimpleNamespace(ptr=p)
    k = launch.Kernel(Raw())
    order = kargs._binding("fused.cu", "quant_amax<__half>")
    bound = kargs._builder(order)
    args = dict(x=Arr(0x1000), K=4096, mode=1, static_scale=None, amax=Arr(0x2000), x8=Arr(0x3000), ld=4096,
                sx=Arr(0x4000))
    k.launch_bound((4, 1), (256,), bound, args, 0)
    assert len(calls) == 1 and not plain
    fptr, grid, block, smem, st, params, extra = calls[0]
    assert (fptr, grid, block, smem, st, params) == (0xF00, (4, 1, 1), (256, 1, 1), 0, 0x5151, None)
    assert extra is bound.layout.extra
    # x, K, mode, static_scale, amax, x8, ld, sx: pointers at multiples of 8, the int ld padded
    assert bound.layout.packed() == struct.pack("<QiiQQQixxxxQ", 0x1000, 4096, 1, 0, 0x2000, 0x3000, 4096, 0x4000)
    with launch.unpacked_launches():
        k.launch_bound((4, 1), (256,), bound, args, 0)
    assert len(plain) == 1 and plain[0][2] == bound.build(args)
    assert launch.packed_enabled()
    launch._STATE["capturing"] = 1                       # a capture: Kernel.__call__ (PDL where on)
    monkeypatch.setattr(launch, "_driver", lambda: None)
    k.launch_bound((4, 1), (256,), bound, args, 0)
    launch._STATE["capturing"] = 0
    k.launch_bound((4, 1), (256,), bound, {**args, "K": 4096.5}, 0)    # a float for an int
    k.launch_bound((1 << 32 | 4, 1), (256,), bound, args, 0)          # a grid ctypes would wrap
    assert len(plain) == 4 and len(calls) == 1 and asked == [0xF00]
    refuse = [1]

    def refusing(*a):                                    # e.g. no context current in this thread yet
        calls.append(a)
        return refuse.pop() if refuse else 0
    monkeypatch.setattr(launch, "_cu_launch", lambda: refusing)
    k3 = launch.Kernel(Raw())
    k3.launch_bound((4, 1), (256,), bound, args, 0)      # refused: CuPy's launch (its context, its errors)
    k3.launch_bound((4, 1), (256,), bound, args, 0)      # then packed again
    assert len(plain) == 5 and len(calls) == 3
    same[0] = False
    k2 = launch.Kernel(Raw())
    k2.launch_bound((4, 1), (256,), bound, args, 0)      # the driver's layout differs: CuPy, remembered
    k2.launch_bound((4, 1), (256,), bound, args, 0)
    assert len(plain) == 7 and len(calls) == 3 and asked == [0xF00, 0xF00, 0xF00]


def test_layout_matches_asks_the_driver_for_every_parameter(monkeypatch):
    """launch.layout_matches: each parameter's offset and size as cuFuncGetParamInfo reports
    them, and none past the last; no such driver call: not packed."""
    from engine.gpu import launch
    lay = launch.ParamLayout(("ptr", "int", "float", "ptr"))
    driver = {0: (0, 8), 1: (8, 4), 2: (12, 4), 3: (16, 8)}

    def info(fptr, i, off, size):
        if i not in driver:
            return 1
        off._obj.value, size._obj.value = driver[i]
        return 0
    monkeypatch.setattr(launch, "_param_info", lambda: info)
    assert launch.layout_matches(1, lay)
    driver[2] = (16, 4)
    assert not launch.layout_matches(1, lay)
    driver[2] = (12, 4)
    driver[4] = (24, 4)                                  # a parameter more than the layout has
    assert not launch.layout_matches(1, lay)
    monkeypatch.setattr(launch, "_param_info", lambda: None)
    assert not launch.layout_matches(1, launch.ParamLayout(("ptr",)))
    from engine.gpu import kargs                         # every scalar type a kernel may take packs
    assert set(kargs.SCALARS) <= set(launch.PACK_CHARS)
