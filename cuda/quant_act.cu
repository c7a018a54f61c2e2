// quant_act.cu — activation quantization to symmetric INT8 (formats.quantize_act_ref).
//
// What: x (M, K) fp16 (passed as raw u16 bits) or fp32, row stride ldx
//       -> x8 (M, ldo) int8 with ldo >= K; columns K..ldo-1 are written as 0 so
//       the GEMM can read a K padded to the weight layout's Kp.
//   quant_act_static<T>:  one float32 scale for the whole tensor
//   quant_act_dynamic<T>: per-row scale s[m] = max|x[m,:]| / 127 (1 for a zero
//                         row), written to sx (M,) float32
// Rounding is bit-identical to NumPy: IEEE float32 division (__fdiv_rn) and
// round-half-to-even (__float2int_rn), clamped to [-127, 127].
// Launch: static — 1-D grid-stride, each thread 4 output columns (one 32-bit
// store when ldo % 4 == 0); dynamic — one 256-thread block per row (the row is
// read twice; the second pass hits L1/L2).
// Why it is fast enough: it is a pure streaming op (2-4 bytes in, 1 out per
// element) with coalesced accesses; it is not where the GEMM time goes.
#include "common.cuh"
#include "rows.cuh"

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<u16>(u16 v) { return f16_bits_to_f32(v); }
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }

__device__ __forceinline__ u32 q8(float x, float s) { return (u32)(unsigned char)quant1(x, s); }  // rows.cuh

template <typename T>
__device__ __forceinline__ void quant_row4(const T* __restrict__ xr, i8* __restrict__ orow,
                                           int c, int K, int ldo, float s) {
    u32 packed = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int col = c + i;
        const u32 b = (col < K) ? q8(to_f32<T>(xr[col]), s) : 0u;
        packed |= b << (8 * i);
    }
    if ((ldo & 3) == 0) {
        *reinterpret_cast<u32*>(orow + c) = packed;
    } else {
#pragma unroll
        for (int i = 0; i < 4; ++i)
            if (c + i < ldo) orow[c + i] = (i8)((packed >> (8 * i)) & 0xFFu);
    }
}

template <typename T>
__global__ void quant_act_static(const T* __restrict__ x, i8* __restrict__ out, float scale,
                                 int M, int K, int ldx, int ldo) {
    pdl_enter();
    const int per_row = (ldo + 3) / 4;
    const long long total = (long long)M * per_row;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int m = (int)(i / per_row);
        const int c = (int)(i % per_row) * 4;
        quant_row4<T>(x + (size_t)m * ldx, out + (size_t)m * ldo, c, K, ldo, scale);
    }
}

template <typename T>
__global__ void __launch_bounds__(256) quant_act_dynamic(const T* __restrict__ x, i8* __restrict__ out,
                                                         float* __restrict__ sx, int M, int K, int ldx, int ldo) {
    pdl_enter();
    __shared__ float red[8];
    const int m = blockIdx.x;
    const T* xr = x + (size_t)m * ldx;
    float amax = 0.f;
    for (int c = threadIdx.x; c < K; c += blockDim.x) amax = nan_max(amax, fabsf(to_f32<T>(xr[c])));
    amax = warp_max(amax);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = amax;
    __syncthreads();
    amax = red[0];
#pragma unroll
    for (int w = 1; w < 8; ++w) amax = nan_max(amax, red[w]);
    const float s = row_scale(MODE_DYNAMIC, amax, nullptr);   // formats.act_scale_dynamic; NaN row: NaN
    if (threadIdx.x == 0) sx[m] = s;
    i8* orow = out + (size_t)m * ldo;
    for (int c = threadIdx.x * 4; c < ldo; c += blockDim.x * 4) quant_row4<T>(xr, orow, c, K, ldo, s);
}
