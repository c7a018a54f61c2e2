"""The learned performance model of the A8W4 GEMM kernels, evaluated with NumPy (docs/PERFMODEL.md).

`python -m engine.bench perf fit` fits scikit-learn random forests on a `perf collect` CSV and
exports them here as plain arrays (.npz, loaded with allow_pickle=False): per tree the node
arrays children_left, children_right, feature, threshold and value, exactly sklearn's
`tree_` arrays, plus a JSON metadata record (the device, the feature names, every kernel
configuration the data held with its per-device attributes, the targets' standardisation,
date and scikit-learn version). `PerfModel.forest_raw` walks those arrays the way sklearn's
`Tree.apply` does (features as float32, `x <= threshold` in float64, left) and averages the
leaves in tree order, so it returns bit for bit what `RandomForestRegressor.predict` does
(tests/test_perfmodel.py checks it). scikit-learn is never imported by the engine.

Also here, because the fit and the engine's choice both need it and neither may import the
launchers (gpu/ops.py imports gpu/choice.py): a configuration's canonical key, and its launch
plan and features, mirroring gpu/ops.py `_run_gemm` (`perf collect` records the real launch
next to the plan and stops on any difference).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .tuning import GEMM, gemv_choice, gemv_targs, wgmma_blocks, wgmma_smem

FORMAT = "dgq-perfmodel-1"
FAMILIES = ("gemv", "mma", "wgmma")
TILE_N, CHUNK_K, K_ALIGN, THREADS = 16, 64, 128, 256      # gpu/ops.py (cuda/common.cuh DGQ_*)

# our model's features (a configuration's static attributes regs and occ come from the device)
FEATURES = ("m", "n", "k", "group", "family", "mt", "rw", "u", "nw", "bm", "stages", "bt", "nwg", "wpf",
            "ovl", "split_auto", "splits", "tile_m", "tile_n", "tile_k", "threads", "smem", "regs", "occ",
            "grid", "waves", "wave_eff", "m_util", "flops", "bytes", "tile_bytes", "ai", "t_roof")
# the GPPerf feature set (ALGORITHMS.md §4): sizes, block tile, arithmetic intensity, bytes, FLOPs
PAPER_FEATURES = ("m", "n", "k", "tile_m", "tile_n", "tile_k", "ai", "bytes", "flops")
ATTRS = ("regs", "occ")
# The forests predict runtime and energy relative to a fixed nominal roofline, t_roof (ms) =
# max(bytes / 3 TB/s, 2MNK / 1 POP/s) + 2 µs: trees are piecewise constant, so a target that
# spans six decades generalises to unseen sizes far better as a ratio to a physical scale.
# The constants only set that scale (the forests learn the ratio); they are not the device's.
ROOF_BYTES_PER_MS, ROOF_OPS_PER_MS, ROOF_FLOOR_MS = 3e9, 1e12, 2e-3
REL_TARGETS = {"log_runtime_rel": "runtime_ms", "log_energy_rel": "energy_mj"}


class PerfModelError(ValueError):
    """A performance model file that cannot be used: missing, corrupt, foreign or for another device."""


# ----------------------------------------------------------------------------- configurations

def config_key(kernel: str, cfg: dict) -> str:
    """Canonical text of one configuration (CSV column `config`, model metadata, choice)."""
    if kernel == "gemv":
        return f"gemv mt={cfg['mt']} rw={cfg['rw']} u={cfg['u']} nw={cfg.get('nw', 8)}"
    sp = cfg.get("splits") or "auto"
    if kernel == "mma":
        return f"mma bm={cfg['bm']} stages={cfg.get('stages', 4)} splits={sp}"
    if kernel == "wgmma":
        return (f"wgmma bt={cfg['bt']} stages={cfg['stages']} nwg={cfg['nwg']} wpf={cfg['wpf']} "
                f"ovl={cfg['ovl']} splits={sp}")
    raise PerfModelError(f"unknown kernel family {kernel!r}; expected one of {FAMILIES}")


def parse_key(key: str) -> tuple[str, dict]:
    """(kernel, cfg) of a config_key: the cfg dict gpu/ops.py gemm_a8w4 takes."""
    fam, *parts = key.split()
    if fam not in FAMILIES:
        raise PerfModelError(f"configuration {key!r}: unknown kernel family {fam!r}")
    cfg = {}
    for p in parts:
        name, _, v = p.partition("=")
        cfg[name] = None if v == "auto" else int(v)
    if config_key(fam, cfg) != key:
        raise PerfModelError(f"configuration {key!r} is not in canonical form")
    return fam, cfg


def padded(n: int, k: int, group: int) -> tuple[int, int]:
    ka = max(K_ALIGN, group)
    return -(-n // TILE_N) * TILE_N, -(-k // ka) * ka


def auto_splits(tiles: int, kt: int, blocks_per_sm: int, sm_count: int) -> int:
    """Split K (the GEMMs' automatic splits, gpu/ops.py) into the most parts whose tiles·splits
    blocks still fit split_target · SMs · blocks/SM, i.e. one wave: a second, partial wave costs
    more than the idle slots of the first (H200, M = 32, 8192×8192: 3 splits 33.8 µs, 4 27.7,
    8 31.8; 11008→4096: 5 splits 29.7, 8 23.6)."""
    target = GEMM.split_target * sm_count * blocks_per_sm
    return int(max(1, min(kt // 4, math.floor(target / tiles), 16)))


def tail_split(tiles: int, kt: int, slots: int) -> tuple[int, int]:
    """(tail_from, tail_splits) of a wgmma launch with no K split: where the tiles fill whole
    waves of `slots` (SMs × blocks/SM) and leave a partial one, that wave's tiles split K as many
    ways as still fit one round of the slots (the rule of auto_splits, for the tail alone; at
    most GEMM.wgmma_tail_max, each split 4 stages or more): the data-parallel + split-K hybrid
    of CUTLASS's stream-K scheduler, in its simplest form. A tail of more than half the slots
    stays whole: H200, 256-token tile, 344 tiles (80 in the tail) ran 3 % slower split 3 ways
    and 9 % slower 2 ways, a partial wave being faster than a full one (fewer blocks share L2);
    36 tiles 3 ways: 11 % faster (docs/KERNELS.md). (tiles, 1): no split tail."""
    full, tail = divmod(tiles, slots)
    s = min(GEMM.wgmma_tail_max, slots // tail if tail else 0, kt // 4)
    if full == 0 or s < 2:
        return tiles, 1
    return tiles - tail, s


def wgmma_tail(cfg: dict, tiles: int, splits: int, kt: int, slots: int) -> tuple[int, int]:
    """(tail_from, tail_splits) of a wgmma launch: tail_split where K is not split, unless cfg
    ["tail"] says: s (the last, partial wave's tiles split s ways; 1: none) or [tail_from, s] (the
    tiles from tail_from on, any tail_from below tiles: tests)."""
    t = cfg.get("tail")
    if t is None:
        return tail_split(tiles, kt, slots) if splits == 1 else (tiles, 1)
    if isinstance(t, int):
        t = [tiles - tiles % slots if tiles > slots and tiles % slots else tiles, t]
    tail_from, ts = (int(v) for v in t)
    if tail_from == tiles:
        return tiles, 1
    if splits != 1 or not 0 <= tail_from < tiles or not 1 <= ts <= kt:
        raise PerfModelError(f"tail {cfg['tail']}: want [tail_from < {tiles} tiles, 1 <= splits <= {kt}] "
                             f"and no K split of the whole (splits = {splits})")
    return tail_from, ts


def wgmma_grid_x(tiles: int, tail_from: int, tail_splits: int) -> int:
    """Grid x of a wgmma launch: the tiles before the tail, then each tail tile tail_splits
    times (cuda/gemm_a8w4_sm90.cu tile_job)."""
    return tail_from + (tiles - tail_from) * tail_splits


def split_tiles(tiles: int, splits: int, tail_from: int, tail_splits: int) -> int:
    """How many partial tiles a launch's split-K workspace holds: every tile's splits, or the
    split tail's (the host never sets both)."""
    if splits > 1:
        return splits * tiles
    return tail_splits * (tiles - tail_from) if tail_splits > 1 else 0


def launch_plan(kernel: str, cfg: dict, m: int, n: int, k: int, group: int, sm_count: int) -> dict:
    """What gpu/ops.py _run_gemm launches for this configuration: expr, grid, block, smem and
    the tile geometry."""
    n_pad, k_pad = padded(n, k, group)
    R, C = n_pad // TILE_N, k_pad // CHUNK_K
    p = {"mt": 0, "rw": 0, "u": 0, "nw": 0, "bm": 0, "stages": 0, "bt": 0, "nwg": 0, "wpf": 0, "ovl": 0,
         "split_auto": 0, "nreg": 0}
    if kernel == "gemv":
        mt, rw, u, nw = cfg["mt"], cfg["rw"], cfg["u"], cfg.get("nw", 8)
        try:                                   # what gpu/ops.py runs for this cfg (the dp4a GEMV at M = 1)
            rw, u, nw, dp = gemv_choice(m, mt, False, {**cfg, "nw": nw})
        except ValueError as e:
            raise PerfModelError(str(e)) from None
        p.update(mt=mt, rw=rw, u=u, nw=nw, expr=f"gemm_a8w4_gemv<{gemv_targs(mt, rw, u, nw, dp)}>",
                 grid=(-(-R // rw), 1), threads=32 * nw, smem=0, splits=1, tile_m=8 * mt, tile_n=TILE_N * rw,
                 tile_k=CHUNK_K * u, tiles=-(-R // rw))
        return p
    if kernel == "mma":
        bm, st = cfg["bm"], cfg.get("stages", 4)
        smem = st * (bm * 128 + 8 * 2 * 512 + 8 * 2 * 32)                 # gpu/ops.py mma_smem
        nreg, bps, tile_m, tile_rt, threads = (bm // 32) * 16, 2, bm, 8, THREADS
        p.update(bm=bm, stages=st, expr=f"gemm_a8w4_mma<{bm},{st},false>")
    elif kernel == "wgmma":
        bt, st, nwg, wpf, ovl = (cfg[x] for x in ("bt", "stages", "nwg", "wpf", "ovl"))
        threads = nwg * 128
        smem = wgmma_smem(bt, st, nwg, wpf)
        nreg, bps = bt // 2, wgmma_blocks(bt, nwg, wpf, st)
        tile_m, tile_rt = bt, nwg * 4
        p.update(bt=bt, stages=st, nwg=nwg, wpf=wpf, ovl=ovl,
                 expr=f"gemm_a8w4_wgmma<{bt},{st},{nwg},{wpf},{ovl},false>")
    else:
        raise PerfModelError(f"unknown kernel family {kernel!r}; expected one of {FAMILIES}")
    tiles = -(-m // tile_m) * -(-R // tile_rt)
    splits = cfg.get("splits") or auto_splits(tiles, C // 2, bps, sm_count)
    splits = int(max(1, min(splits, C // 2)))
    tail_from, tail_splits = (wgmma_tail(cfg, tiles, splits, C // 2, bps * sm_count) if kernel == "wgmma"
                              else (tiles, 1))
    p.update(grid=(wgmma_grid_x(tiles, tail_from, tail_splits), splits), threads=threads, smem=smem,
             splits=splits, split_auto=int(not cfg.get("splits")), tile_m=tile_m, tile_n=TILE_N * tile_rt,
             tile_k=128, tiles=tiles, nreg=nreg, tail_from=tail_from, tail_splits=tail_splits)
    return p


def features(kernel: str, cfg: dict, m: int, n: int, k: int, group: int, sm_count: int, attrs: dict) -> dict:
    """The FEATURES of one call: sizes, configuration, launch geometry, occupancy (attrs: the
    configuration's registers `regs` and resident blocks per SM `occ`, measured on the device),
    compulsory bytes, FLOPs and arithmetic intensity."""
    p = launch_plan(kernel, cfg, m, n, k, group, sm_count)
    n_pad, k_pad = padded(n, k, group)
    occ = max(int(attrs["occ"]), 1)
    grid = p["grid"][0] * p["grid"][1]
    waves = grid / (sm_count * occ)
    w_bytes = n_pad * k_pad // 2 + (n_pad // TILE_N) * (k_pad // group) * 32 + 4 * n_pad   # qw + meta + s8
    x_bytes = m * k_pad + 4 * m
    o_bytes = 2 * m * n
    parts = split_tiles(p["tiles"], p["splits"], p.get("tail_from", p["tiles"]), p.get("tail_splits", 1))
    ws_bytes = 2 * 4 * parts * p["nreg"] * p["threads"]
    nbytes = w_bytes + x_bytes + o_bytes + ws_bytes
    m_tiles = -(-m // p["tile_m"])
    n_tiles = -(-n_pad // p["tile_n"])
    flops = 2.0 * m * n * k
    f = {"m": m, "n": n, "k": k, "group": group, "family": FAMILIES.index(kernel),
         **{x: p[x] for x in ("mt", "rw", "u", "nw", "bm", "stages", "bt", "nwg", "wpf", "ovl", "split_auto",
                              "splits", "tile_m", "tile_n", "tile_k", "threads", "smem")},
         "regs": int(attrs["regs"]), "occ": occ, "grid": grid, "waves": waves,
         "wave_eff": waves / math.ceil(waves), "m_util": m / (m_tiles * p["tile_m"]),
         "flops": flops, "bytes": float(nbytes), "tile_bytes": float(w_bytes * m_tiles + x_bytes * n_tiles),
         "ai": flops / nbytes,
         "t_roof": max(nbytes / ROOF_BYTES_PER_MS, flops / ROOF_OPS_PER_MS) + ROOF_FLOOR_MS}
    return f


def feature_matrix(rows: list[dict], names=FEATURES) -> np.ndarray:
    return np.array([[float(r[x]) for x in names] for r in rows], dtype=np.float64).reshape(len(rows), len(names))


# ----------------------------------------------------------------------------- the forests

@dataclass
class Forest:
    """One exported forest: the trees' node arrays concatenated, trees delimited by offsets."""
    name: str
    features: tuple           # the feature names its columns read
    targets: tuple            # what each output is (e.g. log_runtime_ms, power_w, log_energy_mj)
    mean: np.ndarray          # (n_outputs,) the standardisation the fit applied to the targets
    scale: np.ndarray
    offsets: np.ndarray       # (n_trees + 1,) int64
    left: np.ndarray          # (nodes,) int32, tree-local; -1 at leaves
    right: np.ndarray
    feature: np.ndarray       # (nodes,) int32
    threshold: np.ndarray     # (nodes,) float64
    value: np.ndarray         # (nodes, n_outputs) float64

    def raw(self, X: np.ndarray) -> np.ndarray:
        """(rows, n_outputs) float64: sklearn's forest.predict on X in standardised units."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != len(self.features):
            raise PerfModelError(f"forest {self.name}: X must be (rows, {len(self.features)}), got {X.shape}")
        if not np.isfinite(X).all():
            raise PerfModelError(f"forest {self.name}: features must be finite")
        X32 = X.astype(np.float32).astype(np.float64)          # sklearn compares float32 features
        n_trees = len(self.offsets) - 1
        # every tree at once: node (trees, rows) in global numbering, walked until all are leaves
        node = np.repeat(self.offsets[:-1, None], X.shape[0], axis=1).astype(np.int64)
        base = node.copy()
        col = np.broadcast_to(np.arange(X.shape[0]), node.shape)
        while True:
            inner = self.left[node] >= 0
            if not inner.any():
                break
            ni = node[inner]
            go_left = X32[col[inner], self.feature[ni]] <= self.threshold[ni]
            node[inner] = base[inner] + np.where(go_left, self.left[ni], self.right[ni])
        leaves = self.value[node]                                # (trees, rows, outputs)
        out = np.zeros((X.shape[0], self.value.shape[1]), dtype=np.float64)
        for t in range(n_trees):                                 # in tree order, as sklearn sums
            out += leaves[t]
        out /= n_trees
        return out

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(rows, n_outputs) in the targets' units (mean + scale · raw)."""
        return self.mean + self.scale * self.raw(X)

    def quantities(self, X: np.ndarray) -> dict:
        """{runtime_ms, power_w, energy_mj (those it predicts): (rows,)} from the outputs: a
        log_*_rel output times the row's t_roof, a log_* output exponentiated, others as they are."""
        y = self.predict(X)
        t_roof = X[:, self.features.index("t_roof")] if "t_roof" in self.features else None
        out = {}
        for j, name in enumerate(self.targets):
            if name in REL_TARGETS:
                out[REL_TARGETS[name]] = np.exp(y[:, j]) * t_roof
            elif name.startswith("log_"):
                out[name[4:]] = np.exp(y[:, j])
            else:
                out[name] = y[:, j]
        return out


def _check_forest(name: str, f: Forest, path) -> None:
    n = len(f.left)
    ok = (f.offsets.ndim == 1 and len(f.offsets) >= 2 and f.offsets[0] == 0 and f.offsets[-1] == n
          and np.all(np.diff(f.offsets) > 0)
          and all(a.shape == (n,) for a in (f.right, f.feature, f.threshold))
          and f.value.ndim == 2 and f.value.shape[0] == n and f.value.shape[1] == len(f.targets)
          and f.mean.shape == f.scale.shape == (len(f.targets),))
    if ok:
        sizes = np.repeat(np.diff(f.offsets), np.diff(f.offsets))
        local = np.arange(n) - np.repeat(f.offsets[:-1], np.diff(f.offsets))
        inner = f.left >= 0
        # sklearn numbers children after their parent: checking that bounds every walk
        ok = (np.all((f.left > local) | ~inner) and np.all((f.right > local) | ~inner)
              and np.all(f.left[inner] < sizes[inner]) and np.all(f.right[inner] < sizes[inner])
              and np.all((f.right < 0) == ~inner)
              and np.all((f.feature[inner] >= 0) & (f.feature[inner] < len(f.features)))
              and np.isfinite(f.threshold[inner]).all() and np.isfinite(f.value).all())
    if not ok:
        raise PerfModelError(f"performance model {path}: forest {name!r} is malformed (corrupt file?)")


# ----------------------------------------------------------------------------- the model file

@dataclass
class PerfModel:
    """A loaded model file: its metadata and forests ("time": log runtime on every row;
    "power": log runtime, power and log energy on the rows with an NVML measurement)."""
    path: str
    meta: dict
    forests: dict

    @property
    def device(self) -> str:
        return self.meta["device"]["name"]

    @property
    def configs(self) -> dict:
        """config_key -> {"regs": .., "occ": ..} for every configuration the data held."""
        return self.meta["configs"]

    def features_of(self, kernel: str, cfg: dict, m: int, n: int, k: int, group: int) -> dict:
        attrs = self.configs[config_key(kernel, cfg)]
        return features(kernel, cfg, m, n, k, group, self.meta["device"]["sm_count"], attrs)

    def predict(self, rows: list[dict]) -> dict:
        """Predictions for feature rows: runtime_ms (time forest), power_w and energy_mj (power forest)."""
        t = self.forests["time"]
        out = {"runtime_ms": t.quantities(feature_matrix(rows, t.features))["runtime_ms"]}
        pw = self.forests.get("power")
        if pw is not None:
            q = pw.quantities(feature_matrix(rows, pw.features))
            out.update(power_w=q["power_w"], energy_mj=q["energy_mj"])
        return out


def save(path, meta: dict, forests: dict) -> None:
    """Write a model file atomically (np.savez_compressed of plain arrays, metadata as JSON bytes)."""
    from ..util.files import atomic_file  # noqa: PLC0415
    meta = dict(meta, format=FORMAT, forests={name: {"features": list(f.features), "targets": list(f.targets),
                                                      "mean": [float(v) for v in f.mean],
                                                      "scale": [float(v) for v in f.scale]}
                                               for name, f in forests.items()})
    arrays = {"meta_json": np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)}
    for name, f in forests.items():
        arrays.update({f"{name}.offsets": f.offsets.astype(np.int64), f"{name}.left": f.left.astype(np.int32),
                       f"{name}.right": f.right.astype(np.int32), f"{name}.feature": f.feature.astype(np.int32),
                       f"{name}.threshold": f.threshold.astype(np.float64),
                       f"{name}.value": f.value.astype(np.float64)})
    with atomic_file(path, "xb", flag="performance model") as fh:
        np.savez_compressed(fh, **arrays)


def load(path) -> PerfModel:
    """Read and check a model file; any defect is one PerfModelError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise PerfModelError(f"performance model {path}: no such file")
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zip, npy header, object arrays: all "not a model file"
        raise PerfModelError(f"performance model {path}: not a readable model file "
                             f"({type(e).__name__}: {str(e)[:120]})") from None
    if "meta_json" not in arrays:
        raise PerfModelError(f"performance model {path}: no meta_json record: a foreign file, not one "
                             f"`python -m engine.bench perf fit` wrote")
    try:
        meta = json.loads(bytes(arrays.pop("meta_json")).decode())
    except Exception as e:
        raise PerfModelError(f"performance model {path}: unreadable metadata ({type(e).__name__}: "
                             f"{str(e)[:120]})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise PerfModelError(f"performance model {path}: format {fmt!r} is not {FORMAT!r} (a foreign file, or "
                             f"written by another version)")
    try:
        forests = {}
        for name, fm in meta["forests"].items():
            f = Forest(name, tuple(fm["features"]), tuple(fm["targets"]), np.asarray(fm["mean"], np.float64),
                       np.asarray(fm["scale"], np.float64), arrays[f"{name}.offsets"], arrays[f"{name}.left"],
                       arrays[f"{name}.right"], arrays[f"{name}.feature"], arrays[f"{name}.threshold"],
                       arrays[f"{name}.value"])
            if not set(f.features) <= set(FEATURES):
                raise PerfModelError(f"performance model {path}: forest {name!r} reads unknown features "
                                     f"{sorted(set(f.features) - set(FEATURES))}")
            _check_forest(name, f, path)
            forests[name] = f
        known = set(REL_TARGETS) | {"log_runtime_ms", "log_energy_mj", "power_w"}
        for name, f in forests.items():
            if not set(f.targets) <= known or (set(f.targets) & set(REL_TARGETS) and "t_roof" not in f.features):
                raise PerfModelError(f"performance model {path}: forest {name!r} has unknown targets {f.targets}")
        if "time" not in forests or not {"log_runtime_rel", "log_runtime_ms"} & set(forests["time"].targets):
            raise PerfModelError(f"performance model {path}: no runtime forest")
        if "power" in forests and not ({"power_w"} <= set(forests["power"].targets)
                                       and {"log_energy_rel", "log_energy_mj"} & set(forests["power"].targets)):
            raise PerfModelError(f"performance model {path}: the power forest lacks power and energy outputs")
        dev = meta["device"]
        if not (isinstance(dev["name"], str) and int(dev["sm_count"]) > 0):
            raise PerfModelError(f"performance model {path}: bad device record {dev!r}")
        for key, attrs in meta["configs"].items():
            parse_key(key)
            if not all(isinstance(attrs.get(a), int) for a in ATTRS):
                raise PerfModelError(f"performance model {path}: configuration {key!r} lacks {ATTRS}")
    except PerfModelError:
        raise
    except Exception as e:
        raise PerfModelError(f"performance model {path}: malformed metadata "
                             f"({type(e).__name__}: {str(e)[:120]})") from None
    return PerfModel(str(path), meta, forests)


def device_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200': the file name of a device's model and data."""
    s = "".join(c if c.isalnum() else "-" for c in name.lower())
    return "-".join(p for p in s.split("-") if p) or "unknown"


MODEL_DIR = Path(__file__).resolve().parent / "perf_models"     # shipped models (package data)


def shipped_path(device_name: str) -> Path:
    return MODEL_DIR / f"{device_slug(device_name)}.npz"
