"""Tensor parallelism: the sharding plan and per-rank weights (shard.py), and the sharded forward
simulated on the CPU with ranks as threads and the collectives as sums (sim.py), which equals
the unsharded NumPy model (docs/PARALLEL.md). May import engine.formats, engine.io, engine.model
and engine.util; the GPU launch (one process per GPU, NCCL) is not built yet.
"""
from .shard import Plan, RankPlan, k_align, plan, plan_for, shard, slice_cols, slice_rows
from .sim import Comm, RowParallelLinear, TPCache, TPModel, agree_argmax, run_ranks

__all__ = ["Comm", "Plan", "RankPlan", "RowParallelLinear", "TPCache", "TPModel", "agree_argmax", "k_align",
           "plan", "plan_for", "run_ranks", "shard", "slice_cols", "slice_rows"]
