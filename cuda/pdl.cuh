// pdl.cuh — programmatic dependent launch (PDL), the device side.
//
// While a decode step is captured as a CUDA graph (engine/gpu/launch.py capturing()),
// every kernel of cuda/ is launched with the attribute PROGRAMMATIC_STREAM_SERIALIZATION
// on sm_90+: a kernel may then start while the kernel before it in the stream is still
// running. Its blocks become resident and run up to pdl_wait(), which returns once every
// grid it depends on has completed and its writes are visible. So every kernel here
//   - calls pdl_wait() in every thread before it reads anything an earlier
//     kernel wrote and before it writes anything (its outputs may still be
//     read by the kernel before it), and never returns before the wait: a
//     grid that completes without waiting would let the kernel after it pass
//     its own wait while our predecessor still runs;
//   - may read before the wait only what no kernel of the whole graph writes
//     (weights, tables): every kernel triggers its successor at its start, so
//     launches cascade and a kernel can be resident while kernels several steps
//     earlier still run. That is the point: the decode GEMV streams its first
//     weights in the shadow of the kernels before it. One more kind of data is
//     fixed for a whole replay of the decode step: the sequence lengths and
//     positions (sample_rows, the step's last kernel, advances them after its
//     own wait; graph replays run one after another) and so the KV-cache rows of
//     positions before the new token (written by earlier steps). attn_decode
//     reads those before its wait;
//   - calls pdl_trigger() to let the next kernel launch early (it still waits
//     for our completion, so where the trigger sits is a matter of speed only).
// Without the attribute (eager launches, older GPUs, DGQ_PDL=0, cuBLAS in between)
// both are no-ops and stream order holds as usual.
#pragma once

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The common prologue: let the next kernel launch, then wait for the previous one.
__device__ __forceinline__ void pdl_enter() {
    pdl_trigger();
    pdl_wait();
}
