"""Every environment switch of the engine, read once, here (import time).

  DGQ_DISABLE_CUDA=1   behave as if no GPU were present (--device auto runs NumPy)
  DGQ_PDL=0            no programmatic dependent launch in captured decode steps (gpu/launch.py)
  DGQ_PACKED=0         eager kernel launches through CuPy, not one packed parameter buffer (gpu/launch.py)
  DGQ_NO_WGMMA=1       A8W4 GEMMs on the mma.sync kernels even on sm_90 (gpu/ops.py)
  DGQ_KERNEL_CHOICE=   table | learned | exhaustive: how an A8W4 GEMM's configuration is chosen
                       (gpu/choice.py); unset: learned when the device's model file exists, else table
  DGQ_OBJECTIVE=       time (default) | energy: the learned choice's objective (gpu/choice.py)
  DGQ_PERF_MODEL=PATH  the performance model file to use instead of the shipped one (gpu/perfmodel.py)
  DGQ_ATTN_DECODE=     auto | gqa | heads: the decode attention kernel (gpu/attention.py): attn_decode_gqa
                       (a block per kv head group and sequence split, K/V loaded once per kv head,
                       tensor cores), attn_decode (a block per query head and 64 keys), or auto (the
                       default): gqa for caches of ≥ tuning.ATTENTION.gqa_min_keys positions (≥
                       gqa_min_keys_batch from gqa_batch sequences a step), heads below (measured
                       faster, docs/KERNELS.md)

DGQ_DEBUG=1 (tracebacks instead of one-line errors) belongs to the CLI and is read there.
"""
from __future__ import annotations

import os

DISABLE_CUDA = bool(os.environ.get("DGQ_DISABLE_CUDA"))
PDL = os.environ.get("DGQ_PDL", "1") != "0"
PACKED = os.environ.get("DGQ_PACKED", "1") != "0"
WGMMA = not os.environ.get("DGQ_NO_WGMMA")
KERNEL_CHOICE = os.environ.get("DGQ_KERNEL_CHOICE", "").strip().lower()
OBJECTIVE = os.environ.get("DGQ_OBJECTIVE", "time").strip().lower() or "time"
PERF_MODEL = os.environ.get("DGQ_PERF_MODEL", "")
ATTN_DECODE = os.environ.get("DGQ_ATTN_DECODE", "auto").strip().lower() or "auto"
