"""The learned GEMM performance model (docs/PERFMODEL.md): fit, export, NumPy evaluation, choice.

CPU tests fit on tests/data/perf_small.csv (synthetic rows from engine.bench.perf.synthetic:
real features, formula runtimes) and check that fitting is deterministic, that the exported
arrays predict bit for bit what scikit-learn predicts, that held-out folds never share a
shape with training, that a corrupt, foreign or other-device model file gives one clear
message and the table decides, that unseen configurations fall back to the table, that the
energy objective stays within 5 % of the fastest prediction, and that the choice helpers mirror
gpu/ops.py. The GPU test runs `perf collect --quick`, then fits and reports on its CSV.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from engine.gpu import backend, choice, kernels, perfmodel, tuning
from engine.gpu import ops as ops_cuda
from engine.gpu.perfmodel import FEATURES, PerfModelError, config_key


@pytest.fixture(autouse=True)
def _learn_gemv_too(monkeypatch):
    """The mechanism tests below also cover the GEMV picks, which the shipped default leaves to
    the table (choice.LEARN_GEMV; test_gemv_stays_with_the_table_by_default)."""
    monkeypatch.setattr(choice, "LEARN_GEMV", True)


@pytest.fixture(autouse=True)
def _modeled_tiles_only(monkeypatch):
    """The mechanism tests below run the table among the modeled tiles: with GEMM.wgmma_wsm (the
    default) the learned policy leaves M > 16 to the table (choice.wsm_defers; its own tests
    set it back on)."""
    monkeypatch.setattr(tuning.GEMM, "wgmma_wsm", False)

sklearn = pytest.importorskip("sklearn", reason="the fit needs scikit-learn: pip install -e '.[test]'")
from engine.bench import perf  # noqa: E402

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not backend.has_gpu(), reason="needs an NVIDIA GPU and CuPy")

CSV = Path(__file__).parent / "data" / "perf_small.csv"
DEV = {"name": "Synthetic GPU", "cc": 90, "sm_count": 132, "l2_bytes": 50 << 20, "smem_optin": 232448}


@pytest.fixture(scope="module")
def rows():
    return perf.read_csv(CSV)[1]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    d = tmp_path_factory.mktemp("perf")
    with pytest.MonkeyPatch.context() as mp:             # as _learn_gemv_too (module scope: set up before it)
        mp.setattr(choice, "LEARN_GEMV", True)
        res = perf.fit(CSV, d / "model.npz", d / "report.md", n_trees=12, folds=3, random_split_too=False,
                       plot=False)
    return res, d


@pytest.fixture
def fake_device(monkeypatch):
    """kernels.device_info() of a made-up sm_90 GPU named like the committed CSV; the choice state reset."""
    monkeypatch.setattr(kernels, "device_info", lambda: dict(DEV))
    saved = (choice.STATE.asked, choice.STATE.objective, choice.STATE.model_path)
    yield
    choice.configure(saved[0], saved[1], saved[2] or "")


def test_csv_round_trip_and_columns(rows, tmp_path):
    meta, again = perf.read_csv(CSV)
    assert meta["device"]["name"] == DEV["name"] and len(again) == len(rows) > 100
    assert set(perf.COLUMNS) <= set(rows[0])
    assert {"kernel", "m", "n", "k", "runtime_ms", "power_w", "energy_mj"} <= set(rows[0])
    perf.write_csv(tmp_path / "x.csv", meta, rows)
    assert perf.read_csv(tmp_path / "x.csv")[1] == rows


def test_group_split_never_leaks_a_shape(rows):
    folds = perf.group_folds(rows, 4)
    assert len(folds) == 4
    seen_test = set()
    for tr, te in folds:
        train = {(rows[i]["m"], rows[i]["n"], rows[i]["k"]) for i in tr}
        test = {(rows[i]["m"], rows[i]["n"], rows[i]["k"]) for i in te}
        assert train and test and not train & test
        seen_test |= test
        assert len(tr) + len(te) == len(rows)
    assert len(seen_test) == len({(r["m"], r["n"], r["k"]) for r in rows})


def test_fit_is_deterministic_and_export_is_exact(rows, fitted, tmp_path):
    res, d = fitted
    again = perf.fit(CSV, tmp_path / "m.npz", tmp_path / "r.md", n_trees=12, folds=3, random_split_too=False,
                     plot=False)
    for name, f in res["forests"].items():
        g = again["forests"][name]
        for field in ("offsets", "left", "right", "feature", "threshold", "value", "mean", "scale"):
            assert np.array_equal(getattr(f, field), getattr(g, field)), (name, field)
    assert (d / "report.md").read_text().replace("model.npz", "m.npz") == (tmp_path / "r.md").read_text()
    # sklearn vs the exported arrays, on the rows and on perturbed rows (other threshold sides)
    X = perfmodel.feature_matrix(rows, FEATURES)
    rng = np.random.default_rng(0)
    Xp = np.vstack([X, X * rng.uniform(0.5, 2.0, X.shape)])
    loaded = perfmodel.load(d / "model.npz")
    rf_t = res["rf_time"]
    assert np.array_equal(perf.sk_raw(rf_t, Xp), loaded.forests["time"].raw(Xp))
    prow = [r for r in rows if r.get("power_w") is not None]
    rf_p, f_p = perf.fit_forest(prow, perf.TARGETS_POWER, n_trees=12)
    assert f_p.value.shape[1] == 3
    assert np.array_equal(perf.sk_raw(rf_p, Xp), f_p.raw(Xp))
    assert np.array_equal(loaded.forests["power"].raw(Xp), f_p.raw(Xp))     # the same fit, saved and loaded
    assert loaded.meta["device"]["name"] == DEV["name"] and loaded.meta["sklearn"] == sklearn.__version__
    assert set(loaded.configs) == {r["config"] for r in rows}


def test_exported_power_forest_matches_sklearn(rows):
    prow = [r for r in rows if r.get("power_w") is not None]
    rf, f = perf.fit_forest(prow, perf.TARGETS_POWER, n_trees=7, seed=3)
    X = perfmodel.feature_matrix(rows, FEATURES)
    assert np.array_equal(perf.sk_raw(rf, X), f.raw(X))
    got = f.predict(X)
    assert np.abs(got - (f.mean + f.scale * perf.sk_raw(rf, X))).max() <= 1e-12


def test_report_names_the_split_and_the_paper(fitted):
    res, d = fitted
    text = (d / "report.md").read_text()
    assert "GroupKFold by (M, N, K)" in text and "R² 0.98" in text and "| ours | all | runtime_ms |" in text
    assert "| roofline |" in text and "| paper |" in text and "learned / best" in text


# ----------------------------------------------------------------------------- model files

def _expect_fallback(path, monkeypatch, what):
    choice.configure("learned", "time", str(path))
    with pytest.warns(choice.PerfModelWarning) as w:
        assert choice.resolve() == "table"
    msg = str(w[0].message)
    assert str(path) in msg and what in msg and "table" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choice.configure("learned", "time", str(path))
        choice.STATE.said.add(msg)      # said once per process
        assert choice.resolve() == "table" and not choice.active()
    return msg


def test_corrupt_file_gives_one_clear_error_and_the_table(tmp_path, fake_device, monkeypatch, fitted):
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(PerfModelError, match="not a readable model file"):
        perfmodel.load(bad)
    _expect_fallback(bad, monkeypatch, "not a readable")
    # a truncated copy of a good file
    good = (fitted[1] / "model.npz").read_bytes()
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(good[: len(good) // 2])
    with pytest.raises(PerfModelError, match=str(trunc)):
        perfmodel.load(trunc)
    missing = tmp_path / "none.npz"
    _expect_fallback(missing, monkeypatch, "no such file")


def test_foreign_file_is_refused(tmp_path, fake_device, monkeypatch):
    foreign = tmp_path / "weights.npz"
    np.savez(foreign, a=np.arange(3))
    with pytest.raises(PerfModelError, match="a foreign file"):
        perfmodel.load(foreign)
    other = tmp_path / "other.npz"
    np.savez(other, meta_json=np.frombuffer(json.dumps({"format": "xgboost-9"}).encode(), np.uint8))
    with pytest.raises(PerfModelError, match="foreign"):
        perfmodel.load(other)
    obj = tmp_path / "pickled.npz"
    np.savez(obj, meta_json=np.array([{"format": perfmodel.FORMAT}], dtype=object))
    with pytest.raises(PerfModelError):                 # never unpickled
        perfmodel.load(obj)
    _expect_fallback(foreign, monkeypatch, "a foreign file")


def test_malformed_forest_is_refused(tmp_path, fitted):
    src = fitted[1] / "model.npz"
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["time.left"] = arrays["time.left"].copy()
    inner = np.flatnonzero(arrays["time.left"] >= 0)
    arrays["time.left"][inner[0]] = 0                  # a cycle back to the root
    bad = tmp_path / "cycle.npz"
    np.savez(bad, **arrays)
    with pytest.raises(PerfModelError, match="malformed"):
        perfmodel.load(bad)


def test_other_device_is_never_used(tmp_path, fitted, monkeypatch, fake_device):
    monkeypatch.setattr(kernels, "device_info", lambda: dict(DEV, name="NVIDIA H200"))
    path = fitted[1] / "model.npz"
    with pytest.raises(PerfModelError, match="fitted on 'Synthetic GPU'"):
        choice.load_for_device(path, "NVIDIA H200")
    _expect_fallback(path, monkeypatch, "this GPU is 'NVIDIA H200'")


def test_default_policy_is_table_without_a_model(fake_device, monkeypatch, tmp_path):
    monkeypatch.setattr(perfmodel, "MODEL_DIR", tmp_path)
    choice.configure("", "time", "")
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # silently: no model for this device is normal
        assert choice.resolve() == "table"


def test_default_policy_is_learned_with_the_devices_model(fake_device, monkeypatch, tmp_path, fitted):
    monkeypatch.setattr(perfmodel, "MODEL_DIR", tmp_path)
    (tmp_path / "synthetic-gpu.npz").write_bytes((fitted[1] / "model.npz").read_bytes())
    choice.configure("", "time", "")
    assert choice.resolve() == "learned" and choice.active()


def test_shipped_models_load_and_cover_the_shipped_configurations():
    """Each model under engine/gpu/perf_models/ (package data) is named after the GPU it was
    fitted on and saw every configuration `candidates` offers: otherwise the default would
    silently fall back to the table for whole shape classes (then: perf collect + perf fit)."""
    files = sorted(perfmodel.MODEL_DIR.glob("*.npz"))
    assert files, "no shipped model"
    for f in files:
        m = perfmodel.load(f)
        assert perfmodel.shipped_path(m.device) == f
        for mm in (1, 8, 16, 32, 128, 512, 4096):
            for kern, cfg in choice.candidates(mm, wgmma=True):
                assert config_key(kern, cfg) in m.configs, (f.name, mm, kern, cfg)


def test_bad_policy_names_the_choices(fake_device):
    with pytest.raises(choice.ChoiceError, match="table, learned, exhaustive"):
        choice.configure("fastest")
    with pytest.raises(choice.ChoiceError, match="time, energy"):
        choice.configure("learned", "power")


# ----------------------------------------------------------------------------- the choice

def _learned(fitted, objective="time"):
    choice.configure("learned", objective, str(fitted[1] / "model.npz"))
    assert choice.resolve() == "learned"
    return choice.STATE.model


@pytest.mark.parametrize("m", [1, 7, 16, 24, 100, 700, 5000])
def test_learned_pick_is_the_lowest_prediction(fitted, fake_device, m):
    model = _learned(fitted)
    n, k = 5120, 3072
    cands = choice.candidates(m, True)
    i, pred = choice.learned_pick(model, m, n, k, 128, cands)
    assert i == int(np.argmin(pred["runtime_ms"]))
    assert choice.pick(m, n, k, 128) == cands[i]
    assert choice.pick(m, n, k, 128) is choice.pick(m, n, k, 128)      # memoised


@pytest.mark.parametrize("m", [4, 64, 1024])
def test_energy_objective_stays_within_5_percent(fitted, fake_device, m):
    model = _learned(fitted, "energy")
    cands = choice.candidates(m, True)
    i, pred = choice.learned_pick(model, m, 4096, 4096, 128, cands, "energy")
    t, e = pred["runtime_ms"], pred["energy_mj"]
    assert t[i] <= 1.05 * t.min()
    near = t <= 1.05 * t.min()
    assert e[i] == e[near].min()
    assert choice.pick(m, 4096, 4096, 128) == cands[i]


def test_select_rule():
    t, e = [1.0, 1.03, 1.2, 1.04], [5.0, 4.0, 1.0, 3.0]
    assert choice.select(t) == 0
    assert choice.select(t, table=1, margin=0.0) == 0
    assert choice.select(t, table=1, margin=0.05) == 1          # the table kept within the margin
    assert choice.select(t, table=2, margin=0.05) == 0
    assert choice.select(t, e, "energy") == 3                    # lowest energy among t <= 1.05
    assert choice.select(t, e, "energy", table=0, margin=0.5) == 3


def test_unseen_configuration_falls_back_to_the_table(fitted, fake_device, monkeypatch):
    _learned(fitted)
    monkeypatch.setattr(choice, "WGMMA_CFGS", tuning.WGMMA_CFGS + ((128, 3, 2, 2, 2),))   # a new instantiation
    with pytest.warns(choice.PerfModelWarning, match="never saw: wgmma bt=128 stages=3"):
        assert choice.pick(300, 4096, 4096, 128) is None
    assert choice.pick(8, 4096, 4096, 128) is not None          # GEMV candidates are all known


def test_unseen_group_falls_back_to_the_table(fitted, fake_device):
    _learned(fitted)
    with pytest.warns(choice.PerfModelWarning, match="group size 256: the model saw only \\[128\\]"):
        assert choice.pick(64, 4096, 4096, 256) is None


def test_gemv_only_picks_a_gemv(fitted, fake_device):
    _learned(fitted)
    kern, cfg = choice.pick(16, 4096, 4096, 128, gemv_only=True)
    assert kern == "gemv" and cfg["mt"] == 2


def test_gemv_stays_with_the_table_by_default(fitted, fake_device, monkeypatch):
    monkeypatch.setattr(choice, "LEARN_GEMV", False)
    _learned(fitted)
    assert choice.pick(1, 4096, 4096, 128) is None                       # decode: the table's GEMV
    assert choice.pick(16, 4096, 4096, 128, gemv_only=True) is None
    assert choice.pick(64, 4096, 4096, 128) in choice.candidates(64, True)   # above: learned
    # M = 17..32: GEMV candidates exist, but the learned policy weighs only the tiles
    assert any(k == "gemv" for k, _ in choice.candidates(32, True))
    assert choice.learned_candidates(32, True) == [c for c in choice.candidates(32, True) if c[0] != "gemv"]
    assert choice.pick(32, 4096, 4096, 128)[0] != "gemv"
    monkeypatch.setattr(choice, "LEARN_GEMV", True)
    assert choice.learned_candidates(32, True) == choice.candidates(32, True)


def test_ops_hook_leaves_the_table_path_alone(fitted, fake_device):
    layer = ops_cuda.PackedA8W4(4096, 4096, 128, 4096, 4096, None, None, None)
    x8 = np.zeros((64, 4096), np.int8)
    choice.configure("table", "time", "")
    assert ops_cuda._learned(x8, None, layer, "auto", None, False, False) == ("auto", None)
    _learned(fitted)
    kern, cfg = ops_cuda._learned(x8, None, layer, "auto", None, False, False)
    assert (kern, cfg) in choice.candidates(64, True)
    # explicit kernels, cfg overrides and int32 outputs (tests) are never redirected
    assert ops_cuda._learned(x8, None, layer, "mma", None, False, False) == ("mma", None)
    assert ops_cuda._learned(x8, None, layer, "auto", {"bm": 64}, False, False) == ("auto", {"bm": 64})
    assert ops_cuda._learned(x8, None, layer, "auto", None, True, False) == ("auto", None)


# ----------------------------------------------------------------------------- mirrors of gpu/ops.py

def test_gemv_choice_defaults_fallback_and_errors(monkeypatch):
    """tuning.gemv_choice (what gpu/ops.py launches): the dp4a GEMV at M = 1 by default, with
    gemv_dp_u on wide shapes and gemv_few on few-tile ones; an explicit mma configuration it lacks
    runs the mma GEMV; a dp4a request or tuning value it lacks is an error naming the knob."""
    ch = tuning.gemv_choice
    assert ch(1, 1, False, {}) == (1, tuning.GEMM.gemv_dp_u, 8, True)
    assert ch(1, 1, True, {}) == (1, 2, 16, True)                        # gemv_few: 16 warps
    assert ch(2, 1, False, {}) == (1, 2, 8, False) and ch(12, 2, False, {})[3] is False
    assert ch(1, 1, False, {"rw": 1, "u": 3}) == (1, 3, 8, False)       # mma (1, 3): no dp4a twin
    assert ch(1, 1, False, {"rw": 1, "u": 4}) == (1, 4, 8, True)
    assert ch(1, 1, False, {"dp": False}) == (1, 2, 8, False)
    with pytest.raises(ValueError, match="not instantiated"):
        ch(1, 1, False, {"rw": 1, "u": 3, "dp": True})
    with pytest.raises(ValueError, match="takes M = 1"):
        ch(2, 1, False, {"dp": True})
    monkeypatch.setattr(tuning.GEMM, "gemv_dp_u", 3)
    with pytest.raises(ValueError, match="gemv_dp_u"):
        ch(1, 1, False, {})
    monkeypatch.setattr(tuning.GEMM, "gemv_dp4a", False)
    assert ch(1, 1, False, {}) == (1, 2, 8, False)
    with pytest.raises(PerfModelError, match="takes M = 1"):
        perfmodel.launch_plan("gemv", {"mt": 1, "rw": 1, "u": 2, "dp": True}, 4, 4096, 4096, 128, 132)


def test_gemv_launch_plan_mirrors_ops(monkeypatch):
    """launch_plan names the GEMV instantiation gpu/ops.py launches for every candidate, the dp4a
    variant at M = 1 included (its (RW, U, NW) where instantiated, the mma one elsewhere)."""
    from engine.gpu.tuning import gemv_targs
    monkeypatch.setattr(kernels, "device_info", lambda: dict(DEV, cc=90))
    seen_dp = set()
    for m in (1, 2, 8, 9, 16):
        for n in (512, 4096, 22016):
            for kern, cfg in choice.candidates(m, True):
                if kern != "gemv":
                    continue
                rw, u, nw, dp = ops_cuda._gemv_cfg(m, cfg["mt"], -(-n // 16), dict(cfg))
                plan = perfmodel.launch_plan(kern, cfg, m, n, 4096, 128, DEV["sm_count"])
                want = f"gemm_a8w4_gemv<{gemv_targs(cfg['mt'], rw, u, nw, dp)}>"
                assert (plan["expr"], plan["threads"]) == (want, 32 * nw), cfg
                seen_dp.add((m == 1, dp))
    assert seen_dp == {(True, True), (True, False), (False, False)}    # M = 1: dp4a where it exists


@pytest.mark.parametrize("cc", [80, 90])
def test_gemv_row_bound_depends_on_wgmma(monkeypatch, cc):
    """The GEMV takes up to GEMM.gemv_max_m_wgmma rows where the wgmma GEMM runs above it (sm_90),
    else up to GEMM.gemv_max_m (mma.sync loses to the GEMV there); the model's fold follows."""
    monkeypatch.setattr(kernels, "device_info", lambda: dict(DEV, cc=cc))
    bound = ops_cuda.GEMM.gemv_max_m_wgmma if cc == 90 else ops_cuda.GEMM.gemv_max_m
    assert ops_cuda.gemv_max_m() == bound and (cc != 90 or bound < ops_cuda.GEMM.gemv_max_m)
    assert ops_cuda.choose_kernel(bound) == "gemv"
    assert ops_cuda.choose_kernel(bound + 1) == ("wgmma" if cc == 90 else "mma")
    monkeypatch.setattr(ops_cuda.GEMM, "use_wgmma", False)              # sm_90 without wgmma: the old bound
    assert ops_cuda.gemv_max_m() == ops_cuda.GEMM.gemv_max_m and ops_cuda.choose_kernel(16) == "gemv"


@pytest.mark.parametrize("cc", [80, 90])
def test_table_pick_mirrors_ops(monkeypatch, cc):
    monkeypatch.setattr(kernels, "device_info", lambda: dict(DEV, cc=cc))
    for m in (1, 5, 8, 9, 16, 17, 32, 33, 40, 64, 65, 300, 512, 513, 8192):
        for n in (512, 4096, 8448, 32768):
            kern, cfg = choice.table_pick(m, n, 128, DEV["sm_count"], cc == 90)
            if kern == "wgmma":                   # the buckets' edges: 32-token tiles up to M = 32
                assert (cfg["bt"] == 32) == (m <= 32) and (cfg["bt"] == 64) == (32 < m <= 64)
            assert kern == ops_cuda.choose_kernel(m)
            assert (kern, cfg) in choice.candidates(m, cc == 90), (m, n, kern, cfg)
            if kern == "gemv":
                assert cfg["mt"] == ops_cuda.gemv_mt(m)
                # the explicit cfg runs what the default runs (the dp4a GEMV at M = 1)
                assert ops_cuda._gemv_cfg(m, cfg["mt"], -(-n // 16), cfg) == \
                    ops_cuda._gemv_cfg(m, cfg["mt"], -(-n // 16), {})
            elif kern == "wgmma":
                assert cfg == dataclasses.asdict(tuning.wgmma_cfg(m, n))


def test_launch_plan_mirrors_ops(monkeypatch):
    monkeypatch.setattr(kernels, "device_info", lambda: dict(DEV))
    for m, n, k in ((16, 4096, 4096), (100, 512, 32768), (4096, 28672, 8192), (17, 1000, 700)):
        for kern, cfg in choice.candidates(m, True):
            p = perfmodel.launch_plan(kern, cfg, m, n, k, 128, DEV["sm_count"])
            key = config_key(kern, cfg)
            assert perfmodel.parse_key(key) == (kern, cfg)
            if kern == "mma":
                assert p["smem"] == ops_cuda.mma_smem(cfg["bm"], cfg["stages"])
            if kern != "gemv" and not cfg["splits"]:
                bps = 2 if kern == "mma" else tuning.wgmma_blocks(cfg["bt"], cfg["nwg"], cfg["wpf"], cfg["stages"])
                n_pad, k_pad = ops_cuda.padded_dims(n, k, 128)
                want = max(1, min(ops_cuda._splits(p["tiles"], k_pad // 128, bps), k_pad // 128))
                assert p["splits"] == want
            f = perfmodel.features(kern, cfg, m, n, k, 128, DEV["sm_count"], {"regs": 96, "occ": 2})
            assert list(f) == list(FEATURES) and all(np.isfinite(float(v)) for v in f.values())


def test_candidates_are_instantiated():
    for m in (1, 8, 9, 16, 17, 32, 33, 128, 129, 256, 8192):
        for kern, cfg in choice.candidates(m, True):
            if kern == "gemv":
                table = tuning.GEMV_CFGS if cfg["nw"] == 8 else tuning.GEMV_WIDE
                assert (cfg["rw"], cfg["u"]) in table[cfg["mt"]] and m <= 8 * cfg["mt"]
            elif kern == "mma":
                assert (cfg["bm"], cfg["stages"]) in tuning.MMA_CFGS
            else:
                assert (cfg["bt"], cfg["stages"], cfg["nwg"], cfg["wpf"], cfg["ovl"]) in tuning.WGMMA_CFGS


def test_plan_is_deterministic_and_fits_the_budget():
    a = perf.plan(480.0, seed=0)
    b = perf.plan(480.0, seed=0)
    assert a["hash"] == b["hash"] and a["points"] == b["points"]
    assert a["est_s"] <= 480.0 * 1.05 and any(p["power"] for p in a["points"])
    assert perf.plan(480.0, seed=1)["hash"] != a["hash"]
    q = perf.plan(30.0, quick=True)
    assert 0 < len(q["points"]) <= 20 and q["est_s"] <= 32
    for p in a["points"]:
        assert 1 <= p["m"] <= 8192 and p["k"] % 128 == 0 and p["n"] % 128 == 0
        assert 512 <= p["k"] <= 32768 or p["source"] == "llm"


def test_cli_fit_and_report(tmp_path, capsys):
    from engine.bench.__main__ import main
    model, md = tmp_path / "m.npz", tmp_path / "r.md"
    assert main(["perf", "fit", str(CSV), "--model", str(model), "--md", str(md), "--trees", "4", "--folds", "2",
                 "--jobs", "1", "--no-random-split"]) == 0
    assert main(["perf", "report", str(model), "--csv", str(CSV), "--md", str(tmp_path / "rep.md")]) == 0
    text = (tmp_path / "rep.md").read_text()
    assert "Synthetic GPU" in text and "learned / best" in text


def test_fit_pools_several_csvs_of_one_device(tmp_path):
    meta, rows = perf.read_csv(CSV, refeature=False)
    a, b = rows[: len(rows) // 2], rows[len(rows) // 2:]
    perf.write_csv(tmp_path / "a.csv", meta, a)
    perf.write_csv(tmp_path / "b.csv", meta, b)
    res = perf.fit([tmp_path / "a.csv", tmp_path / "b.csv"], tmp_path / "m.npz", tmp_path / "r.md", n_trees=4,
                   folds=2, random_split_too=False, plot=False)
    assert len(res["rows"]) == len(rows)
    assert "a.csv" in (tmp_path / "r.md").read_text() and "b.csv" in (tmp_path / "r.md").read_text()
    other = dict(meta, device=dict(meta["device"], name="Another GPU"))
    perf.write_csv(tmp_path / "c.csv", other, [dict(r, device="Another GPU") for r in b])
    with pytest.raises(perf.BenchError, match="mixes devices"):
        perf.fit([tmp_path / "a.csv", tmp_path / "c.csv"], tmp_path / "m2.npz", tmp_path / "r2.md", n_trees=4,
                 folds=2, random_split_too=False, plot=False)
    assert not (tmp_path / "m2.npz").exists()


# ----------------------------------------------------------------------------- GPU

@gpu
@needs_gpu
def test_collect_quick_then_fit_and_choose(tmp_path):
    """`perf collect --quick` end to end on this GPU (NVML power included), then fit, report, and
    the learned choice running real GEMMs bit-exactly like the table's."""
    pytest.importorskip("pynvml", reason="perf collect needs nvidia-ml-py")
    from engine.bench.__main__ import main
    csv_path = tmp_path / "quick.csv"
    assert main(["perf", "collect", "--quick", "--out", str(csv_path)]) == 0
    meta, rows = perf.read_csv(csv_path)
    info = kernels.device_info()
    assert meta["device"]["name"] == info["name"] and len(rows) > 50
    assert all(r["runtime_ms"] > 0 for r in rows)
    pw = [r for r in rows if r.get("power_w") is not None]
    assert pw and all(20 < r["power_w"] < 2000 and r["energy_mj"] > 0 for r in pw)
    model = tmp_path / "model.npz"
    assert main(["perf", "fit", str(csv_path), "--model", str(model), "--md", str(tmp_path / "r.md"),
                 "--trees", "20", "--folds", "3", "--no-random-split"]) == 0
    assert main(["perf", "report", str(model), "--csv", str(csv_path)]) == 0
    cp = backend.cupy_or_none()
    saved = (choice.STATE.asked, choice.STATE.objective, choice.STATE.model_path)
    try:
        layer = ops_cuda.random_packed(4096, 4096, 128, seed=3)
        for m in (1, 16, 64, 256):
            x8 = cp.random.randint(-127, 128, (m, 4096), dtype=cp.int32).astype(cp.int8)
            sx = cp.full((m,), 0.01, dtype=cp.float32)
            choice.configure("table", "time", "")
            ref = ops_cuda.gemm_a8w4(x8, sx, layer)
            for pol, obj in (("learned", "time"), ("learned", "energy"), ("exhaustive", "time")):
                choice.configure(pol, obj, str(model))
                assert choice.resolve() == pol
                got = ops_cuda.gemm_a8w4(x8, sx, layer)
                assert cp.array_equal(got, ref), (m, pol, obj)
    finally:
        choice.configure(saved[0], saved[1], saved[2] or "")


# ----------------------------------------------------------------------------- collect's plumbing, no GPU

class _Clock:
    """A virtual GPU timeline: launches take `step` seconds; events and syncs follow it."""
    def __init__(self, step=0.001):
        import time
        self.time, self.step, self.vt = time, step, 0.0

    def launch(self, n=1):
        self.vt = max(self.vt, self.time.perf_counter()) + n * self.step

    def now(self):
        return max(self.vt, self.time.perf_counter())

    def wait(self, t):
        self.time.sleep(max(0.0, t - self.time.perf_counter()))


def _fake_cupy(clock):
    import types
    cp = types.SimpleNamespace(__version__="fake", int8=np.int8, int32=np.int32, float16=np.float16,
                               float32=np.float32, uint32=np.uint32)
    cp.random = types.SimpleNamespace(randint=lambda lo, hi, shape, dtype=None: np.zeros(shape, dtype or np.int64))
    cp.full, cp.empty, cp.zeros, cp.ones = (lambda s, v, dtype=None: np.full(s, v, dtype)), np.empty, np.zeros, np.ones
    cp.get_default_memory_pool = lambda: types.SimpleNamespace(free_all_blocks=lambda: None)

    class Event:
        def record(self, stream=None):
            self.t = clock.now()

        def synchronize(self):
            clock.wait(self.t)

    class Graph:
        def launch(self, stream=None):
            clock.launch(4)

    class Stream:
        def __init__(self, non_blocking=False):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def begin_capture(self):
            pass

        def end_capture(self):
            return Graph()

        def synchronize(self):
            clock.wait(clock.vt)

    dev = types.SimpleNamespace(id=0, synchronize=lambda: clock.wait(clock.vt))
    cp.cuda = types.SimpleNamespace(
        Event=Event, Stream=Stream, Device=lambda *a: dev,
        get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3,
        driver=types.SimpleNamespace(occupancyMaxActiveBlocksPerMultiprocessor=lambda f, t, s: 2),
        runtime=types.SimpleNamespace(deviceGetPCIBusId=lambda d: "0000:01:00.0"))
    return cp


def _fake_nvml():
    import time
    import types

    class NVMLError(Exception):
        pass
    t0 = time.perf_counter()
    # 300 W, an energy counter that moves every 20 ms
    energy = lambda h: int(300.0 * 1e3 * (int((time.perf_counter() - t0) / 0.02) * 0.02))  # noqa: E731
    return types.SimpleNamespace(NVMLError=NVMLError, nvmlInit=lambda: None, nvmlShutdown=lambda: None,
                                 nvmlDeviceGetHandleByPciBusId=lambda b: "h", nvmlDeviceGetHandleByIndex=lambda i: "h",
                                 nvmlDeviceGetTotalEnergyConsumption=energy,
                                 nvmlDeviceGetPowerUsage=lambda h: 300000)


def test_collect_plumbing_with_a_fake_gpu(tmp_path, monkeypatch):
    """perf collect end to end on a fake CuPy, NVML and gemm_a8w4 that launches what
    launch_plan says: planning, the launch check, attributes, power from the energy counter,
    the CSV with its header, resume and the atomic publish. Not a measurement."""
    import sys
    from engine.bench import common
    from engine.gpu import kargs
    clock = _Clock()
    cp = _fake_cupy(clock)
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml())
    monkeypatch.setattr(kernels, "device_info", lambda: dict(DEV, name="Fake GPU"))
    monkeypatch.setattr(common, "cp_or_fail", lambda: cp)
    monkeypatch.setattr(common, "n_buffers", lambda nbytes: 2)
    monkeypatch.setattr(common, "time_calls", lambda fn, reps=50, warmup=5: [fn(i) for i in range(2)] and 0.0123)
    monkeypatch.setattr(kargs, "launch", lambda kf, expr, grid, block, shared_mem=0, **a: clock.launch())
    fn = type("F", (), {"num_regs": 96, "raw": type("R", (), {"kernel": type("K", (), {"ptr": 1})()})()})()
    monkeypatch.setattr(kargs, "function", lambda kf, expr: fn)

    def random_packed(n, k, group=128, seed=0, act="dynamic"):
        n_pad, k_pad = ops_cuda.padded_dims(n, k, group)
        return ops_cuda.PackedA8W4(n, k, group, n_pad, k_pad, np.zeros(1), np.zeros(1), np.zeros(1))

    def gemm_a8w4(x8, sx, layer, kernel="auto", cfg=None, out=None, resid=None):
        if cfg:
            p = perfmodel.launch_plan(kernel, cfg, x8.shape[0], layer.n, layer.k, layer.group, DEV["sm_count"])
            # through the (patched) kargs.launch as ops.py does; a fake, not a launch tests/test_kernel_args.py checks
            launch = getattr(kargs, "launch")
            launch(ops_cuda.GEMV_FILE, p["expr"], p["grid"][:1] if kernel == "gemv" else p["grid"], (p["threads"],),
                   shared_mem=p["smem"])
        return out
    monkeypatch.setattr(ops_cuda, "random_packed", random_packed)
    monkeypatch.setattr(ops_cuda, "gemm_a8w4", gemm_a8w4)
    real_plan = perf.plan

    def small_plan(*a, **k):
        pl = real_plan(*a, **k)
        pts = [p for p in pl["points"] if p["m"] in (1, 300)][:3]
        pts[0]["power"] = True
        return dict(pl, points=[dict(p, power=p is pts[0]) for p in pts])
    monkeypatch.setattr(perf, "plan", small_plan)
    out = tmp_path / "fake.csv"
    partial = out.with_name(out.name + ".partial")
    # an interrupted run: the first call dies on the second problem; the rerun resumes
    calls = {"n": 0}
    real_features = perfmodel.features

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real_features(*a, **k)
    monkeypatch.setattr(perfmodel, "features", dying)
    with pytest.raises(KeyboardInterrupt):
        perf.collect(str(out), budget_s=30, quick=True, progress=False)
    assert partial.is_file() and not out.exists()
    done = len(perf._rows(partial.read_text()))
    assert done == 9
    monkeypatch.setattr(perfmodel, "features", real_features)
    assert perf.collect(str(out), budget_s=30, quick=True, progress=False) == str(out)
    assert not partial.exists()
    text = out.read_text()
    assert "NVML energy counter present" in text and "# measured" in text
    import re
    assert 15 < float(re.search(r"update interval ([\d.]+) ms", text).group(1)) < 25
    meta, rows = perf.read_csv(out)
    assert meta["device"]["name"] == "Fake GPU" and meta["quick"] is True
    keys = [(r["config"], r["m"], r["n"], r["k"]) for r in rows]
    assert len(keys) == len(set(keys))                  # resumed, nothing twice
    pw = [r for r in rows if r["power_w"] is not None]
    assert pw and all(abs(r["power_w"] - 300.0) < 15 and r["power_src"] == "energy" for r in pw)
    assert all(r["runtime_ms"] == 0.0123 and r["regs"] == 96 and r["occ"] == 2 for r in rows)
    assert {r["m"] for r in rows} <= {1, 300}


def test_auto_splits_fill_one_wave_and_refit_keeps_recorded_splits(rows):
    """auto_splits: the most splits whose blocks fit one wave (at least 1, at most kt // 4 and 16);
    a CSV row measured with automatic splits keeps the count it ran with when refeatured."""
    assert perfmodel.auto_splits(64, 64, 2, 132) == 4          # 256 blocks of 264 slots, not 5 (320)
    assert perfmodel.auto_splits(32, 86, 2, 132) == 8
    assert perfmodel.auto_splits(200, 64, 2, 132) == 1         # never a second, partial wave
    assert perfmodel.auto_splits(500, 64, 2, 132) == 1
    assert perfmodel.auto_splits(4, 64, 2, 132) == 16
    assert perfmodel.auto_splits(4, 8, 2, 132) == 2            # kt // 4
    # M = 32, 8192 x 8192, the 64-token tile: 64 tiles, today's rule 4 splits; a row measured
    # under the former rule recorded 3 and keeps them
    r = {"config": "wgmma bt=64 stages=6 nwg=2 wpf=4 ovl=2 splits=auto", "m": 32, "n": 8192, "k": 8192,
         "group": 128, "splits": 3, "regs": 114, "occ": 2}
    kern, cfg = perfmodel.parse_key(r["config"])
    assert perfmodel.features(kern, cfg, 32, 8192, 8192, 128, DEV["sm_count"], r)["splits"] == 4
    f = perf._refeature(r, DEV["sm_count"])
    assert f["splits"] == 3 and f["split_auto"] == 1
    assert perf._refeature({**r, "splits": None}, DEV["sm_count"])["splits"] == 4      # not recorded: today's
    assert tuning.wgmma_blocks(64, 2, 4) == 2 and tuning.wgmma_blocks(128, 2, 4) == 1
    assert tuning.wgmma_blocks(32, 2, 2) == 3 and tuning.wgmma_blocks(256, 2, 2) == 1
    # WPF = 0 (weights in the shared-memory ring): its stages bind, 12.5 KB a stage at BT = 32
    assert tuning.wgmma_smem(32, 5, 2, 0) == 5 * (32 * 128 + 8 * 1088) + 1024
    assert tuning.wgmma_blocks(32, 2, 0, 5) == 3 and tuning.wgmma_blocks(32, 2, 0, 6) == 2
    assert tuning.wgmma_blocks(64, 1, 0, 4) == 4


def test_wgmma_cfg_as_cfg_is_asdict():
    """WgmmaCfg.as_cfg (gpu/ops.py's cfg of a table tile) is dataclasses.asdict, for every tile."""
    cfgs = [c for _, c in tuning.GEMM.wgmma_wsm_tiles] + list(tuning.GEMM.wgmma.values()) + [
        tuning.GEMM.wgmma_wsm_few, tuning.WgmmaCfg(*tuning.WGMMA_CFGS[0], 3)]
    for c in cfgs:
        assert c.as_cfg() == dataclasses.asdict(c) and list(c.as_cfg()) == list(tuning.WGMMA_KEYS)


def test_tail_split_fills_one_round_and_leaves_big_tails_whole(monkeypatch):
    """tail_split: the last, partial wave's tiles split as many ways as fit one round of the slots
    (one block an SM: 132), at most wgmma_tail_max; never without a partial wave, never with less
    than one full wave, never below 4 stages a split, never for a tail of more than half the slots
    (the H200 timings in its docstring)."""
    monkeypatch.setattr(tuning.GEMM, "wgmma_tail_max", 6)
    assert perfmodel.tail_split(344, 32, 132) == (344, 1)       # 2 waves + 80 tiles: whole (timed)
    assert perfmodel.tail_split(432, 40, 132) == (396, 3)       # 3 waves + 36: 108 blocks
    assert perfmodel.tail_split(1728, 40, 132) == (1716, 6)     # + 12: 11 would fit, 6 at most
    assert perfmodel.tail_split(1376, 32, 132) == (1320, 2)     # + 56
    assert perfmodel.tail_split(192, 32, 132) == (132, 2)       # + 60
    assert perfmodel.tail_split(264, 32, 132) == (264, 1)       # whole waves
    assert perfmodel.tail_split(100, 32, 132) == (100, 1)       # under one wave: auto_splits' business
    assert perfmodel.tail_split(140, 7, 132) == (140, 1)        # 7 stages: no two splits of >= 4
    assert perfmodel.tail_split(140, 8, 132) == (132, 2)
    assert perfmodel.tail_split(300, 64, 264) == (264, 6)       # two blocks an SM: 264 slots
    monkeypatch.setattr(tuning.GEMM, "wgmma_tail_max", 1)
    assert perfmodel.tail_split(432, 40, 132) == (432, 1)
    # cfg["tail"]: a count for the partial wave, or [tail_from, count]; one clear error otherwise
    assert perfmodel.wgmma_tail({"tail": 2}, 344, 1, 32, 132) == (264, 2)      # timed, not the rule's
    assert perfmodel.wgmma_tail({"tail": 2}, 264, 1, 32, 132) == (264, 1)
    assert perfmodel.wgmma_tail({"tail": [0, 5]}, 20, 1, 32, 132) == (0, 5)
    assert perfmodel.wgmma_tail({}, 344, 2, 32, 132) == (344, 1)            # K already split
    assert perfmodel.wgmma_tail({"tail": [20, 2]}, 20, 1, 32, 132) == (20, 1)      # from the end: none
    for bad in ([21, 2], [-1, 2], [3, 0], [3, 33]):
        with pytest.raises(PerfModelError, match="tail"):
            perfmodel.wgmma_tail({"tail": bad}, 20, 1, 32, 132)
    with pytest.raises(PerfModelError, match="tail"):
        perfmodel.wgmma_tail({"tail": [3, 2]}, 20, 2, 32, 132)


def test_launch_plan_and_refeature_carry_the_split_tail(monkeypatch):
    """launch_plan's grid has the split tail's blocks (what ops launches), its features count the
    partials' bytes, and a CSV row recorded without a tail is refeatured without one."""
    monkeypatch.setattr(tuning.GEMM, "wgmma_tail_max", 6)
    cfg = {"bt": 256, "stages": 4, "nwg": 2, "wpf": 0, "ovl": 2, "splits": 1}
    p = perfmodel.launch_plan("wgmma", cfg, 1024, 13824, 5120, 128, 132)     # 432 tiles: 396 + 36 · 3
    assert (p["tiles"], p["tail_from"], p["tail_splits"], p["grid"]) == (432, 396, 3, (396 + 36 * 3, 1))
    attrs = {"regs": 253, "occ": 1}
    f = perfmodel.features("wgmma", cfg, 1024, 13824, 5120, 128, 132, attrs)
    f0 = perfmodel.features("wgmma", {**cfg, "tail": 1}, 1024, 13824, 5120, 128, 132, attrs)
    assert f["grid"] == 504 and f0["grid"] == 432
    assert f["bytes"] - f0["bytes"] == 2 * 4 * 3 * 36 * 128 * 256
    r = {"config": config_key("wgmma", cfg), "m": 1024, "n": 13824, "k": 5120, "group": 128, "regs": 253,
         "occ": 1, "splits": 1, "grid_x": 432}
    assert perf._refeature(r, 132)["grid"] == 432
    assert perf._refeature({**r, "grid_x": 504}, 132)["grid"] == 504
    f2 = perf._refeature({**r, "grid_x": 396 + 36 * 2}, 132)       # run under another tail count
    assert f2["grid"] == 468 and f2["bytes"] - f0["bytes"] == 2 * 4 * 2 * 36 * 128 * 256
    with pytest.raises(PerfModelError, match="split tail"):
        perf._refeature({**r, "grid_x": 450}, 132)


def test_wgmma_wsm_knob_gives_every_m_a_wpf0_tile(monkeypatch):
    assert tuning.wgmma_cfg(24) == tuning.GEMM.wgmma["tiny"]
    monkeypatch.setattr(tuning.GEMM, "wgmma_wsm", True)
    assert all(tuning.wgmma_cfg(m).wpf == 0 for m in (24, 64, 200, 1024))
    assert [tuning.wgmma_cfg(m).bt for m in (17, 32, 33, 64, 65, 128, 129, 512, 513, 8192)] == \
        [32, 32, 64, 64, 128, 128, 256, 256, 256, 256]
    assert tuning.wgmma_cfg(512, 4096).bt == 256                          # 2 × 32 = 64 tiles: not few
    assert tuning.wgmma_cfg(64, 2048).bt == 64 and tuning.wgmma_cfg(32, 512).bt == 32   # BT < 128: never few
    assert tuning.wgmma_cfg(1024).splits == 1 and tuning.wgmma_cfg(512).splits is None
    assert tuning.wgmma_cfg(1024, modeled=True) == tuning.GEMM.wgmma["large"]
    # few tiles of 128 or 256 tokens (M = 128 or 256, N = 4096: 32) take one warpgroup a block
    for m in (128, 256):
        assert tuning.wgmma_cfg(m, 4096) == tuning.GEMM.wgmma_wsm_few and tuning.wgmma_cfg(m, 4096).nwg == 1
        assert tuning.wgmma_cfg(m, 11008).nwg == 2 and tuning.wgmma_cfg(m).nwg == 2
    assert tuning.wgmma_cfg(32, 4096).bt == 32 and tuning.wgmma_cfg(2048, 4096).bt == 256
    assert all(c.tile in tuning.WGMMA_UNMODELED for _, c in tuning.GEMM.wgmma_wsm_tiles)
    assert tuning.GEMM.wgmma_wsm_few.tile in tuning.WGMMA_UNMODELED
    assert tuning.GEMM.wgmma_wsm_tiles[-1][0] is None                     # every M has a tile
    for m in (24, 64, 200, 1024):
        assert tuning.wgmma_cfg(m).tile in tuning.WGMMA_CFGS
        assert all(c[1].get("wpf") != 0 for c in choice.candidates(m, wgmma=True))   # unmodeled: not offered
        assert choice.table_pick(m, 4096, 128, 132, True)[1]["wpf"] == 0
        modeled = choice.table_pick(m, 4096, 128, 132, True, modeled=True)        # perf's choice_eval table
        assert modeled in choice.candidates(m, wgmma=True)
        assert modeled[1]["wpf"] == tuning.GEMM.wgmma[tuning.wgmma_bucket(m)].wpf != 0


def test_learned_policy_leaves_the_wsm_buckets_to_the_table(fake_device, fitted, monkeypatch):
    choice.configure("learned", "time", str(fitted[1] / "model.npz"))
    assert choice.pick(24, 4096, 4096, 128) is not None and choice.pick(64, 4096, 4096, 128) is not None
    monkeypatch.setattr(tuning.GEMM, "wgmma_wsm", True)
    assert choice.pick(24, 4096, 4096, 128) is None and choice.pick(64, 4096, 4096, 128) is None   # the table
    assert choice.pick(256, 4096, 4096, 128) is None
    monkeypatch.setattr(tuning.GEMM, "wgmma_wsm_tiles", tuning.GEMM.wgmma_wsm_tiles[:2])   # none past M = 64
    assert choice.pick(256, 4096, 4096, 128) is not None                  # is the learned policy's (memo keyed on it)
    assert not choice.wsm_defers(8, True) and not choice.wsm_defers(24, False)
    assert not choice.wsm_defers(24, True, gemv_only=True)


def test_pick_memo_follows_the_gemv_row_bound(fake_device, monkeypatch):
    """A pick is memoised per GEMV row bound (e2e --ab gemv_max_m_wgmma=16 in one process): at M = 12
    the exhaustive choice weighs the tiles under bound 8 and only GEMVs under bound 16, and neither
    answer survives into the other setting."""
    choice.configure("exhaustive", "time", "")
    timer = lambda kern, cfg: 1.0 if kern == "wgmma" else 2.0           # noqa: E731
    monkeypatch.setattr(tuning.GEMM, "gemv_max_m_wgmma", 8)
    assert choice.pick(12, 4096, 4096, 128, timer=timer)[0] == "wgmma"
    monkeypatch.setattr(tuning.GEMM, "gemv_max_m_wgmma", 16)
    assert choice.pick(12, 4096, 4096, 128, timer=timer)[0] == "gemv"
    monkeypatch.setattr(tuning.GEMM, "gemv_max_m_wgmma", 8)
    assert choice.pick(12, 4096, 4096, 128, timer=None)[0] == "wgmma"    # memoised, its own bound


def test_exhaustive_policy_times_the_wpf0_tiles_too(fake_device, monkeypatch):
    """The exhaustive choice weighs every instantiated tile, the WPF = 0 ones the model has not
    timed included (choice.candidates unmodeled): with a timer that makes one of them fastest it
    picks it; and GEMM.wgmma_wsm_skip (gemm --tune-json's buckets) leaves only those buckets'
    table entries to GEMM.wgmma."""
    monkeypatch.setattr(tuning.GEMM, "wgmma_wsm", True)
    choice.configure("exhaustive", "time", "")
    best = {"bt": 128, "stages": 4, "nwg": 1, "wpf": 0, "ovl": 2, "splits": 1}
    timed = []

    def timer(kern, cfg):
        timed.append(cfg)
        return 1.0 if cfg == best else 2.0
    assert choice.pick(200, 4096, 4096, 128, timer=timer) == ("wgmma", best)
    assert any(c.get("wpf") == 0 for c in timed) and any(c.get("wpf") == 2 for c in timed)
    assert choice.pick(200, 4096, 4096, 128, timer=None) == ("wgmma", best)   # memoised
    monkeypatch.setattr(tuning.GEMM, "wgmma_wsm_skip", frozenset({"mid"}))
    assert tuning.wgmma_cfg(200, 11008) == tuning.GEMM.wgmma["mid"] and tuning.wgmma_cfg(1024).wpf == 0
    assert tuning.wgmma_cfg(24).wpf == 0 and not choice.wsm_defers(200, True) and choice.wsm_defers(1024, True)
