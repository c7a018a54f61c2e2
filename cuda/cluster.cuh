// cluster.cuh — thread block clusters (sm_90): the barrier, ranks and distributed shared memory.
//
// A launch without a cluster attribute runs as clusters of one CTA: cluster_size() is 1 there.
// Below sm_90 these compile to nothing (rank 0, size 1, loads of 0): their callers never take
// a cluster path there (the launchers ask for clusters on sm_90 only).
#pragma once

__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

__device__ __forceinline__ int cluster_rank() {
    unsigned rank = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
#endif
    return (int)rank;
}

__device__ __forceinline__ int cluster_size() {
    unsigned n = 1;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(n));
#endif
    return (int)n;
}

// The address of p (this CTA's shared memory) in the shared memory of CTA `rank` of the cluster.
__device__ __forceinline__ unsigned cluster_addr(const void* p, int rank) {
    unsigned remote = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const unsigned local = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
#endif
    return remote;
}

// The float at p in the shared memory of CTA `rank` of this cluster (distributed shared memory).
__device__ __forceinline__ float ld_cluster(const float* p, int rank) {
    float x = 0.f;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(x) : "r"(cluster_addr(p, rank)) : "memory");
#endif
    return x;
}

// The four ints at p (16-byte aligned) in the shared memory of CTA `rank`. No memory clobber:
// the loads of several ranks may be in flight together; cluster_sync orders them.
__device__ __forceinline__ int4 ld_cluster_s32x4(const int4* p, int rank) {
    int4 v = make_int4(0, 0, 0, 0);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("ld.shared::cluster.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(cluster_addr(p, rank)));
#endif
    return v;
}
