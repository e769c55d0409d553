// Tensor-core kernels for bf16 / fp16 (fp32 accumulation), d <= 128: mma.sync.m16n8k16 everywhere, or
// wgmma.mma_async.m64n64k16 on sm_90a when asked for (ADASSL_FAST_CUDA_WGMMA=1; the Path parameter below).
//
// One kernel template covers the three passes (MODE): the forward row LSE, the row-owned dU pass and
// the column-owned dV pass. They read only the normalised rows u / v that the prologue
// (prep_rows_kernel) materialised in contiguous scratch buffers, so nt_xent and AdaSSL share these
// kernels and no tile does any per-row latent work: S = (scale / tau) * <u_i, v_j>. A CTA of 4 warps
// owns 64 rows (16 per warp) whose operand fragments stay in registers for the whole run; it streams
// 64-row tiles of the other side through shared memory (double-buffered, cp.async). exp2 with log2(e)
// folded in. Every gradient element is produced by one thread in a fixed order: no atomics, bitwise
// reproducible.
//
// Tile shape: 8-warp CTAs (128 owned rows) build without spills too and halve the streamed-tile traffic
// per owned row, but measured no faster on the H200 (bench/results/2026-11-28_1954-NVIDIA-H200-cuda-8warps),
// so 4 warps are kept: exactly the one warpgroup a 64-row wgmma tile needs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "adassl_generic.cuh"
#include "adassl_sw128.cuh"

namespace adassl {

template <class T>
struct MmaTraits {
  static constexpr bool kOk = false;
};
template <>
struct MmaTraits<__nv_bfloat16> {
  static constexpr bool kOk = true;
};
template <>
struct MmaTraits<__half> {
  static constexpr bool kOk = true;
};

constexpr int kMW = 4;              // warps per CTA
constexpr int kMThreads = 32 * kMW;
constexpr int kMRows = 16 * kMW;    // owned rows per CTA
constexpr int kMCols = 64;          // streamed rows per tile (must equal kMRows: the owned tile reuses a buffer)
static_assert(kMCols == kSwRows, "AsyncMma's swizzled tiles (adassl_sw128.cuh) hold kMCols rows");
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(uint32_t r[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t r[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <class T>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <class T>
__device__ __forceinline__ float2 unpack2(uint32_t w) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&w));
  } else {
    return __half22float2(*reinterpret_cast<__half2*>(&w));
  }
}

// A fragment (16 x 16, k-step kk) of a product whose left operand is held as accumulators g[16 x 64]:
// n-tiles 2kk and 2kk + 1, rounded to T.
template <class T, int NT>
__device__ __forceinline__ void pack_a(uint32_t (&a)[4], const float (&g)[NT][4], int kk) {
  a[0] = pack2<T>(g[2 * kk][0], g[2 * kk][1]);
  a[1] = pack2<T>(g[2 * kk][2], g[2 * kk][3]);
  a[2] = pack2<T>(g[2 * kk + 1][0], g[2 * kk + 1][1]);
  a[3] = pack2<T>(g[2 * kk + 1][2], g[2 * kk + 1][3]);
}

// The two matrix-instruction paths the core kernel is written against (its Path parameter). Both keep
// the owned rows' A fragments in registers (ldmatrix from the staged owned tile) and stream 64-row tiles
// of the other side through two shared-memory buffers; they differ in the buffers' layout and in who
// multiplies:
// - SyncMma (sm_80 and up): each warp issues mma.sync.m16n8k16 on its 16 rows, B fragments through
//   ldmatrix; rows padded by 16 bytes so the 8 row addresses of every ldmatrix hit distinct banks.
// - AsyncMma (sm_90a, ADASSL_FAST_CUDA_WGMMA=1): the CTA's 4 warps are one warpgroup and issue
//   wgmma.mma_async.m64n64k16 with A from registers and B read by the tensor cores straight from shared
//   memory (no per-warp ldmatrix of B: a quarter of SyncMma's shared-memory reads). Tiles use the 128-byte
//   swizzle: 64-column (128-byte) atoms of 64 rows, 16-byte chunk c of row r stored at chunk c ^ (r % 8).
//   The same tile serves S = U V^T (B K-major: rows of the tile are B's columns) and G V (B MN-major,
//   transposed read), so nothing is transposed in memory.
// Accumulator layouts coincide: for m16n8 (per warp) and m64nN (per warpgroup, warp w owning rows
// 16w..16w+15) a thread holds rows g and g + 8, columns 8n + 2t + {0, 1} of n-tile n; and that layout
// is the A-fragment layout, so G goes from accumulators to the next product's A operand by packing.

// Stage rows [r0, r0 + ROWS) x [0, DP) of the contiguous (nrows, ldu) buffer src into buf with cp.async,
// element (r, c) at Path::offset<DP>(r, c). ldu is a multiple of 8 and the buffer's pad columns are zero;
// rows past nrows and chunks past ldu are zero-filled, so they add nothing to any product.
template <class Path, class T, int DP, int ROWS>
__device__ __forceinline__ void load_tile(const T* __restrict__ src, int64_t r0, int64_t nrows, int ldu, T* buf) {
  constexpr int CPR = DP / 8;
  for (int e = threadIdx.x; e < ROWS * CPR; e += kMThreads) {
    const int r = e / CPR, c = e % CPR;
    const int64_t row = r0 + r;
    T* dst = buf + Path::template offset<DP>(r, c * 8);
    if (row < nrows && c * 8 < ldu) {
      cp_async16(dst, src + row * ldu + c * 8);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

struct SyncMma {
  template <int DP>
  static constexpr int kTileElems = kMCols * (DP + 8);

  template <int DP>
  __device__ static __forceinline__ int offset(int r, int c) {
    return r * (DP + 8) + c;
  }

  // Make the staged tile visible to this path's readers (ldmatrix: ordinary shared loads; the barrier
  // that follows is enough).
  __device__ static __forceinline__ void publish() {}

  // acc[16 x 64] = A[16 x DP] (this warp's owned rows) * tile^T
  template <class T, int DP>
  __device__ static __forceinline__ void s_product(float (&acc)[kMCols / 8][4], const uint32_t (&qa)[DP / 16][4],
                                                   const T* sb) {
    const int lane = threadIdx.x & 31, q = lane >> 3;
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < kMCols / 16; ++np) {
        uint32_t b[4];
        const int n = np * 16 + (lane & 7) + (q >> 1) * 8;
        const int c = kk * 16 + (q & 1) * 8;
        ldsm_x4(b, smem_u32(&sb[offset<DP>(n, c)]));
        mma16816<T>(acc[2 * np], qa[kk], b[0], b[1]);
        mma16816<T>(acc[2 * np + 1], qa[kk], b[2], b[3]);
      }
    }
  }

  // dacc[16 x DP] += G[16 x 64] * tile[64 x DP]: G from this warp's accumulators, the tile through
  // ldmatrix.trans.
  template <class T, int DP>
  __device__ static __forceinline__ void grad_product(float (&dacc)[DP / 8][4], const float (&g)[kMCols / 8][4],
                                                      const T* sb) {
    const int lane = threadIdx.x & 31, q = lane >> 3;
#pragma unroll
    for (int kk = 0; kk < kMCols / 16; ++kk) {
      uint32_t a[4];
      pack_a<T>(a, g, kk);
#pragma unroll
      for (int np = 0; np < DP / 16; ++np) {
        uint32_t b[4];
        const int r = kk * 16 + (lane & 7) + (q & 1) * 8;
        const int c = np * 16 + (q >> 1) * 8;
        ldsm_x4_t(b, smem_u32(&sb[offset<DP>(r, c)]));
        mma16816<T>(dacc[2 * np], a, b[0], b[1]);
        mma16816<T>(dacc[2 * np + 1], a, b[2], b[3]);
      }
    }
  }
};

// wgmma and its ordering instructions exist only in sm_90a code; elsewhere AsyncMma's bodies trap (the
// launcher never picks it there: async_mma_enabled()).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ADASSL_WGMMA 1
#endif

// Keeps the compiler from moving accesses of an accumulator across the asynchronous product.
template <int N>
__device__ __forceinline__ void fence_regs(float (&c)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n) {
    asm volatile("" : "+f"(c[n][0]), "+f"(c[n][1]), "+f"(c[n][2]), "+f"(c[n][3])::"memory");
  }
}

// The same for A fragments written just before a product: their writes stay ahead of wgmma.fence, which
// PTX requires between ordinary register writes and the wgmma that reads them.
template <int N>
__device__ __forceinline__ void fence_regs(uint32_t (&a)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n) {
    asm volatile("" : "+r"(a[n][0]), "+r"(a[n][1]), "+r"(a[n][2]), "+r"(a[n][3])::"memory");
  }
}

// d[64 x 64] += A[64 x 16] (registers, this thread's fragment a) * B[16 x 64] (shared memory, desc);
// TNSP_B 0: B K-major (its columns are rows of the tile), 1: MN-major (rows of the tile are B's rows).
template <class T, int TNSP_B>
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc) {
#ifdef ADASSL_WGMMA
#define ADASSL_WGMMA_ASM(TYPE)                                                                                   \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                      \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "                                  \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "      \
               "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, " \
               "%38;\n}\n"                                                                                       \
               : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),        \
                 "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),        \
                 "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]),        \
                 "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),        \
                 "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),        \
                 "+f"(d[7][2]), "+f"(d[7][3])                                                                    \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1), "n"(TNSP_B))
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    ADASSL_WGMMA_ASM("bf16");
  } else {
    ADASSL_WGMMA_ASM("f16");
  }
#undef ADASSL_WGMMA_ASM
#else
  __trap();
#endif
}

__device__ __forceinline__ void wgmma_fence() {
#ifdef ADASSL_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

// Issue point of a group of products, then wait for all of them (the accumulators are read next).
__device__ __forceinline__ void wgmma_commit_and_wait() {
#ifdef ADASSL_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
}

struct AsyncMma {
  template <int DP>
  static constexpr int kTileElems = kMCols * DP;

  template <int DP>
  __device__ static __forceinline__ int offset(int r, int c) {
    return sw128_offset(r, c);
  }

  // The tensor cores read shared memory through the async proxy: each writing thread (cp.async and the
  // zero fills are generic-proxy writes) fences before the barrier that precedes the products.
  __device__ static __forceinline__ void publish() {
#ifdef ADASSL_WGMMA
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
  }

  // acc[64 x 64] = U[64 x DP] (owned rows, A fragments in registers) * tile^T (B K-major)
  template <class T, int DP>
  __device__ static __forceinline__ void s_product(float (&acc)[kMCols / 8][4], const uint32_t (&qa)[DP / 16][4],
                                                   const T* sb) {
    const uint32_t base = smem_u32(sb);
    fence_regs(acc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) wgmma_m64n64k16<T, 0>(acc, qa[kk], s_operand_desc(base, kk));
    wgmma_commit_and_wait();
    fence_regs(acc);
  }

  // dacc[64 x DP] += G[64 x 64] * tile[64 x DP] (B MN-major), one 64-wide product per atom of d
  template <class T, int DP>
  __device__ static __forceinline__ void grad_product(float (&dacc)[DP / 8][4], const float (&g)[kMCols / 8][4],
                                                      const T* sb) {
    const uint32_t base = smem_u32(sb);
    uint32_t a[kMCols / 16][4];
#pragma unroll
    for (int kk = 0; kk < kMCols / 16; ++kk) pack_a<T>(a[kk], g, kk);
    fence_regs(a);
    fence_regs(dacc);
    wgmma_fence();
#pragma unroll
    for (int f = 0; f < DP / 64; ++f) {
      float(&blk)[8][4] = *reinterpret_cast<float(*)[8][4]>(&dacc[8 * f]);
#pragma unroll
      for (int kk = 0; kk < kMCols / 16; ++kk) wgmma_m64n64k16<T, 1>(blk, a[kk], g_operand_desc(base, f, kk));
    }
    wgmma_commit_and_wait();
    fence_regs(dacc);
  }
};

// MODE kFwd: owned = u (cont rows), streamed = v -> lse, row loss. kRow: owned = u, streamed = v ->
// g_out = dL/du and one partial of sum G * C per CTA. kCol: owned = v (targ rows), streamed = u ->
// g_out = dL/dv. Tiles with no positive / excluded entry and no row past the end ("plain" tiles, all but
// O(1) per owned block for nt_xent) skip the index tests; the decision is warp-uniform (kFwd, kRow: a
// vote over the warp's 16 rows) or CTA-uniform (kCol: flags the loader computes with the metadata).
// Plain tiles also skip the clamp when no logit can reach it (clamp_live below, uniform per launch):
// |S| <= |alpha| cos_bound, cos_bound an upper bound on |<u_i, v_j>| (run_core: 1.02 for unit rows, +inf for
// rows taken as given).
template <class T, int DP, int MODE, class Path>
__global__ void __launch_bounds__(kMThreads)
    mma_core_kernel(const T* __restrict__ own, const T* __restrict__ str, int64_t n_own, int64_t n_str, int d,
                    int ldu, const int64_t* __restrict__ pos, const int64_t* __restrict__ excl,
                    const float* __restrict__ lse_in, const float* scale_p, const float* gl_p, float inv_temp,
                    float clampv, float inv_m, float* out_lse, float* out_rowloss, float* g_out,
                    float* part_out, float cos_bound) {
  constexpr int KS = DP / 16;      // k-steps of the S product
  constexpr int NT = kMCols / 8;   // n-tiles of S per warp
  constexpr int NF = DP / 8;       // feature n-tiles of the gradient product
  constexpr int MW = kMCols / 32;  // loader warps of the kCol metadata
  static_assert(kMRows <= 2 * kMCols, "the owned tile is staged through the two stream buffers");
  static_assert(kMCols % 32 == 0 && kMCols <= kMThreads, "kCol metadata: whole warps, one row per thread");
  __shared__ __align__(1024) T sbuf[2][Path::template kTileElems<DP>];  // 1024: AsyncMma's swizzle atoms
  __shared__ float s_lse[2][kMCols];  // kCol: lse * log2(e) of the streamed u rows
  __shared__ int64_t s_pos[2][kMCols];
  __shared__ int64_t s_exc[2][kMCols];
  __shared__ int s_flag[2][MW];       // kCol: the tile holds a special entry (per loader warp)
  __shared__ float s_red[kMW];

  // fp16 has 5 exponent bits: lift the gradient operand (|P - 1| <= 1) away from the subnormal range.
  // bf16 has float32's range and needs no lift.
  constexpr float kAScale = std::is_same<T, __half>::value ? 64.f : 1.f;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int64_t o0 = static_cast<int64_t>(blockIdx.x) * kMRows;
  const bool own_tail = o0 + kMRows > n_own;
  const float alpha = *scale_p * inv_temp;
  const float alpha2 = alpha * kLog2e;
  const float gfac = (MODE == kFwd) ? 0.f : *gl_p * inv_m;
  // With |alpha| * cos_bound < clamp no logit can reach the clamp: plain tiles then skip the clamp and its
  // gradient indicator (for unit rows the usual tau = 0.1, lambda < 1.9 regime).
  const bool clamp_live = fabsf(alpha) * cos_bound >= clampv;

  // Owned-row metadata: this thread's rows are warp*16 + g and + 8. ptile / etile: the streamed tile
  // that holds the positive / excluded column (-1: none).
  int64_t orow[2];
  float olse2[2] = {0.f, 0.f};
  int64_t opos[2] = {-2, -2}, oexc[2] = {-2, -2};
  int ptile[2] = {-1, -1}, etile[2] = {-1, -1};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    orow[h] = o0 + warp * 16 + g + 8 * h;
    if (MODE != kCol && orow[h] < n_own) {
      opos[h] = pos[orow[h]];
      oexc[h] = excl[orow[h]];
      if (opos[h] >= 0) ptile[h] = static_cast<int>(opos[h] / kMCols);
      if (oexc[h] >= 0) etile[h] = static_cast<int>(oexc[h] / kMCols);
      if (MODE == kRow) olse2[h] = lse_in[orow[h]] * kLog2e;
    }
  }

  auto load_meta = [&](int64_t s0, int buf) {
    if (MODE == kCol && tid < kMCols) {
      const int64_t i = s0 + tid;
      const bool v = i < n_str;
      const int64_t p = v ? pos[i] : -2, e = v ? excl[i] : -2;
      s_lse[buf][tid] = v ? lse_in[i] * kLog2e : 0.f;
      s_pos[buf][tid] = p;
      s_exc[buf][tid] = e;
      const bool hit = !v || (p >= o0 && p < o0 + kMRows) || (e >= o0 && e < o0 + kMRows);
      const unsigned b = __ballot_sync(0xffffffffu, hit);
      if (lane == 0) s_flag[buf][warp] = b != 0u;
    }
  };

  // Prologue: owned tile -> the stream buffers (one contiguous span) -> registers.
  T* const sflat = &sbuf[0][0];
  if constexpr (std::is_same<Path, AsyncMma>::value) {
    if (smem_u32(sflat) & 1023u) __trap();  // the swizzle atoms need 1024-byte alignment: never compute wrong
  }
  load_tile<Path, T, DP, kMRows>(own, o0, n_own, ldu, sflat);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t qa[KS][4];
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    const int q = lane >> 3;
    const int r = warp * 16 + (lane & 7) + (q & 1) * 8;
    const int c = kk * 16 + (q >> 1) * 8;
    ldsm_x4(qa[kk], smem_u32(sflat + Path::template offset<DP>(r, c)));
  }
  __syncthreads();

  const int ntiles = static_cast<int>((n_str + kMCols - 1) / kMCols);
  if (ntiles > 0) {
    load_tile<Path, T, DP, kMCols>(str, 0, n_str, ldu, sbuf[0]);
    load_meta(0, 0);
    cp_async_commit();
  }

  float m2[2] = {-INFINITY, -INFINITY}, l2[2] = {0.f, 0.f}, spos[2] = {0.f, 0.f};
  float dacc[NF][4];
#pragma unroll
  for (int f = 0; f < NF; ++f) dacc[f][0] = dacc[f][1] = dacc[f][2] = dacc[f][3] = 0.f;

  for (int it = 0; it < ntiles; ++it) {
    const int cur = it & 1;
    if (it + 1 < ntiles) {
      load_tile<Path, T, DP, kMCols>(str, static_cast<int64_t>(it + 1) * kMCols, n_str, ldu, sbuf[cur ^ 1]);
      load_meta(static_cast<int64_t>(it + 1) * kMCols, cur ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    Path::publish();
    __syncthreads();
    const T* sb = sbuf[cur];
    const int64_t s0 = static_cast<int64_t>(it) * kMCols;

    bool special;
    if (MODE == kCol) {
      special = own_tail;
#pragma unroll
      for (int w = 0; w < MW; ++w) special = special || s_flag[cur][w] != 0;
    } else {
      const bool hit = own_tail || s0 + kMCols > n_str || ptile[0] == it || ptile[1] == it || etile[0] == it ||
                       etile[1] == it;
      special = __any_sync(0xffffffffu, hit);
    }

    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    Path::template s_product<T, DP>(acc, qa, sb);

    if (MODE == kFwd) {
      float tmax[2] = {-INFINITY, -INFINITY};
      if (!special && !clamp_live) {
#pragma unroll
        for (int n = 0; n < NT; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float v = acc[n][e] * alpha2;
            acc[n][e] = v;
            tmax[e >> 1] = fmaxf(tmax[e >> 1], v);
          }
        }
      } else if (!special) {
#pragma unroll
        for (int n = 0; n < NT; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float v = clamp_logit(acc[n][e] * alpha, clampv) * kLog2e;
            acc[n][e] = v;
            tmax[e >> 1] = fmaxf(tmax[e >> 1], v);
          }
        }
      } else {
#pragma unroll
        for (int n = 0; n < NT; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int h = e >> 1;
            const int64_t j = s0 + n * 8 + 2 * t + (e & 1);
            const float x = clamp_logit(acc[n][e] * alpha, clampv);
            if (j == opos[h]) spos[h] = x;
            const float v = (j < n_str && j != oexc[h]) ? x * kLog2e : -INFINITY;
            acc[n][e] = v;
            tmax[h] = fmaxf(tmax[h], v);
          }
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float mn = fmaxf(m2[h], tmax[h]);
        if (mn == -INFINITY) continue;
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < NT; ++n) sum += fast_exp2(acc[n][2 * h] - mn) + fast_exp2(acc[n][2 * h + 1] - mn);
        l2[h] = l2[h] * fast_exp2(m2[h] - mn) + sum;
        m2[h] = mn;
      }
    } else {
      // grad_loss / M is applied in the epilogue, not here: the operand below is rounded to T, and for
      // fp16 a 1/M factor would push it into the subnormal range (kAScale lifts it further).
      if (!special && !clamp_live) {
#pragma unroll
        for (int n = 0; n < NT; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float l2i = (MODE == kRow) ? olse2[e >> 1] : s_lse[cur][n * 8 + 2 * t + (e & 1)];
            acc[n][e] = fast_exp2(fmaf(acc[n][e], alpha2, -l2i)) * kAScale;
          }
        }
      } else if (!special) {
#pragma unroll
        for (int n = 0; n < NT; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float S = acc[n][e] * alpha;
            const float l2i = (MODE == kRow) ? olse2[e >> 1] : s_lse[cur][n * 8 + 2 * t + (e & 1)];
            const float P = fast_exp2(clamp_logit(S, clampv) * kLog2e - l2i);
            acc[n][e] = P * clamp_pass(S, clampv) * kAScale;
          }
        }
      } else {
#pragma unroll
        for (int n = 0; n < NT; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int h = e >> 1;
            const int c = n * 8 + 2 * t + (e & 1);
            const int64_t sidx = s0 + c;
            const float S = acc[n][e] * alpha;
            const float x = clamp_logit(S, clampv);
            int64_t j, pi, ei;
            float l2i;
            if (MODE == kRow) {
              j = sidx;
              pi = opos[h];
              ei = oexc[h];
              l2i = olse2[h];
            } else {
              j = orow[h];
              pi = s_pos[cur][c];
              ei = s_exc[cur][c];
              l2i = s_lse[cur][c];
            }
            const bool valid = sidx < n_str && orow[h] < n_own;
            const float P = (j == ei) ? 0.f : fast_exp2(x * kLog2e - l2i);
            const float G = valid ? (P - (j == pi ? 1.f : 0.f)) * clamp_pass(S, clampv) : 0.f;
            acc[n][e] = G * kAScale;
          }
        }
      }
      // dacc[16 x DP] += G[16 x 64] * X[64 x DP], X the streamed normalised rows
      Path::template grad_product<T, DP>(dacc, acc, sb);
    }
    __syncthreads();
  }

  if (MODE == kFwd) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // merge the 4 lanes of the quad (base-2 states), fixed xor order
#pragma unroll
      for (int o = 1; o < 4; o <<= 1) {
        const float mo = __shfl_xor_sync(0xffffffffu, m2[h], o);
        const float lo = __shfl_xor_sync(0xffffffffu, l2[h], o);
        spos[h] += __shfl_xor_sync(0xffffffffu, spos[h], o);
        const float mn = fmaxf(m2[h], mo);
        if (mn != -INFINITY) {
          l2[h] = l2[h] * fast_exp2(m2[h] - mn) + lo * fast_exp2(mo - mn);
          m2[h] = mn;
        }
      }
      if (t == 0 && orow[h] < n_own) {
        const float lse = (m2[h] == -INFINITY) ? -INFINITY : (m2[h] + __log2f(l2[h])) * kLn2;
        out_lse[orow[h]] = lse;
        out_rowloss[orow[h]] = lse - spos[h];
      }
    }
  } else {
    const float gscale = alpha * gfac / kAScale;
    const bool pairs = (d & 1) == 0;  // k even: (k, k + 1) are one aligned float2 of the row
#pragma unroll
    for (int f = 0; f < NF; ++f) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int k = f * 8 + 2 * t;
        if (orow[h] >= n_own || k >= d) continue;
        float* dst = g_out + orow[h] * d + k;
        if (pairs) {
          *reinterpret_cast<float2*>(dst) = make_float2(gscale * dacc[f][2 * h], gscale * dacc[f][2 * h + 1]);
        } else {
          dst[0] = gscale * dacc[f][2 * h];
          if (k + 1 < d) dst[1] = gscale * dacc[f][2 * h + 1];
        }
      }
    }
    if (MODE == kRow) {
      // dscale partial by the bilinear identity sum_ij G_ij C_ij = sum_i <u_i, (G V)_i>: dacc holds
      // (G V) for this thread's rows and features, and qa holds the same elements of u (the A-fragment
      // and accumulator layouts coincide), so no per-element product is needed in the tile loop.
      float dpart = 0.f;
#pragma unroll
      for (int f = 0; f < NF; ++f) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float2 uu = unpack2<T>(qa[f >> 1][(f & 1) * 2 + h]);
          dpart += dacc[f][2 * h] * uu.x + dacc[f][2 * h + 1] * uu.y;
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) dpart += __shfl_xor_sync(0xffffffffu, dpart, o);
      if (lane == 0) s_red[warp] = dpart;
      __syncthreads();
      if (tid == 0) {
        float s = 0.f;
        for (int w = 0; w < kMW; ++w) s += s_red[w];
        part_out[blockIdx.x] = s * gfac / kAScale;
      }
    }
  }
}

template <class T, int DP, int MODE, class Path>
int64_t launch_mma(cudaStream_t s, const T* own, const T* str, int64_t n_own, int64_t n_str, int d, int ldu,
                   const int64_t* pos, const int64_t* excl, const float* lse_in, const float* scale_p,
                   const float* gl_p, float inv_temp, float clampv, float inv_m, float* out_lse,
                   float* out_rowloss, float* g_out, float* part_out, float cos_bound) {
  const unsigned nb = static_cast<unsigned>((n_own + kMRows - 1) / kMRows);
  if (nb == 0) return 0;
  mma_core_kernel<T, DP, MODE, Path><<<nb, kMThreads, 0, s>>>(own, str, n_own, n_str, d, ldu, pos, excl, lse_in,
                                                              scale_p, gl_p, inv_temp, clampv, inv_m, out_lse,
                                                              out_rowloss, g_out, part_out, cos_bound);
  return nb;
}

// AsyncMma runs on sm_90 devices when ADASSL_FAST_CUDA_WGMMA=1 (read at every launch, so tests can switch):
// opt-in until the wgmma path has been checked and timed against SyncMma on a GPU (bench/device_check.sh
// runs the GPU tests and the benchmark with it).
inline bool async_mma_enabled() {
  const char* v = std::getenv("ADASSL_FAST_CUDA_WGMMA");
  if (v == nullptr || v[0] != '1' || v[1] != '\0') return false;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  return major == 9;
}

template <class T, int MODE, class A>
int64_t run_mma_core(cudaStream_t s, const T* own, const T* str, int64_t n_own, int64_t n_str, int d, int ldu,
                     const int64_t* pos, const int64_t* excl, const A* lse_in, const A* scale_p, const A* gl_p,
                     A inv_temp, A clampv, A inv_m, A* out_lse, A* out_rowloss, A* g_out, A* part_out,
                     float cos_bound) {
  if constexpr (std::is_same<A, float>::value) {
#define ADASSL_MMA_CALL(DPV, PATH)                                                                               \
  return launch_mma<T, DPV, MODE, PATH>(s, own, str, n_own, n_str, d, ldu, pos, excl, lse_in, scale_p, gl_p,   \
                                        inv_temp, clampv, inv_m, out_lse, out_rowloss, g_out, part_out, cos_bound)
    const bool async = async_mma_enabled();  // (its 64-column swizzle atoms need d > 32)
    if (d <= 32) ADASSL_MMA_CALL(32, SyncMma);
    if (d <= 64) {
      if (async) ADASSL_MMA_CALL(64, AsyncMma);
      ADASSL_MMA_CALL(64, SyncMma);
    }
    if (async) ADASSL_MMA_CALL(128, AsyncMma);
    ADASSL_MMA_CALL(128, SyncMma);
#undef ADASSL_MMA_CALL
  }
  return 0;
}

}  // namespace adassl
