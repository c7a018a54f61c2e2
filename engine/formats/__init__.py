"""The packed weight layouts and their NumPy integer reference: what a quantized weight means.

One module per weight kind (dg.py: dual-grained A8W4; g.py: group-wise float scales; i8.py:
per-channel INT8), the shared constants and activation rules in common.py, and the layer
record with its reference linear in linear.py. The converters produce QuantLinears,
engine/io/qfile.py stores them, engine/model runs them, and the CUDA kernels (cuda/*.cu,
repacked at load time by engine/gpu/ops.py) reproduce `linear_ref` bit for bit.

This package imports nothing else of the engine. The names below are its public surface.
"""
from .common import (ACT_MODES, DEFAULT_GROUP, FP16_MAX, QMAX_I8, QMAX_U4, FormatError, act_scale_dynamic,
                     epilogue_ref, expand_groups, gemm_a8w4_ref, group_index, n_groups, pack_uint4,
                     quantize_act_ref, unpack_uint4)
from .dg import S_MAX, S_MIN, check_no_overflow
from .linear import (ARRAY_FIELDS, KINDS, WEIGHT_KINDS, QuantLinear, activation_scales, kind_tensors, linear_ref,
                     validate)

__all__ = ["ACT_MODES", "ARRAY_FIELDS", "DEFAULT_GROUP", "FP16_MAX", "KINDS", "QMAX_I8", "QMAX_U4", "S_MAX", "S_MIN", "WEIGHT_KINDS",
           "FormatError", "QuantLinear", "act_scale_dynamic", "activation_scales", "check_no_overflow",
           "epilogue_ref", "expand_groups", "gemm_a8w4_ref", "group_index", "kind_tensors", "linear_ref",
           "n_groups", "pack_uint4", "quantize_act_ref", "unpack_uint4", "validate"]
