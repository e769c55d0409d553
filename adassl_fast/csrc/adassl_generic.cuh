// Plain-FMA kernels for every dtype and every d (the float32 / float64 paths, and the fallback for
// shapes the tensor-core kernels do not cover), plus the O(M d) helper kernels shared by all paths:
// the prologue that materialises the normalised rows u / v (+ the AdaSSL regulariser per row), the
// deterministic reductions, and the normalisation backward / AdaSSL chain rule (which read the fp32
// gradients w.r.t. u / v that the core kernels write).
#pragma once

#include <cstdint>

#include "adassl_math.cuh"
#include "adassl_sources.cuh"

namespace adassl {

enum Mode : int { kFwd = 0, kRow = 1, kCol = 2 };

constexpr int kGT = 32;        // owned rows and streamed rows per tile
constexpr int kGK = 32;        // k chunk staged in shared memory
constexpr int kGThreads = 256;  // 32 owned rows x 8 threads, each 4 streamed rows

// Row width of the normalised scratch buffers u / v: d rounded up to 8 elements, so every row starts on
// a 16-byte boundary for 2-byte types and the tensor-core loaders can copy whole 16-byte chunks.
inline int pad_cols(int d) { return (d + 7) / 8 * 8; }

// Prologue (O(M d)): materialise the normalised rows once. For every row i of src (the AdaSSL edited
// rows are formed here, rounded to T, exactly as the source defines them) computes
// inv = 1 / max(||x_i||, 1e-12) in A and writes u_i = x_i * inv, rounded to T, to the contiguous
// (rows, ldu) buffer `out` (pad columns [d, ldu) are zero); optionally the per-row regulariser sum.
// normalize = false (rows taken as given): inv = 1, u_i = x_i (already a T value: exact).
// One warp per row. x_i is parked in `out` on the first pass (exact: it is already a T value) and read
// back by the same lane on the second, so the latent transcendental work runs once per element.
template <class T, class A, class Src>
__global__ void __launch_bounds__(256)
    prep_rows_kernel(Src src, int64_t rows, int d, int ldu, T* out, A* rowreg, bool normalize) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (i >= rows) return;
  T* o = out + i * ldu;
  A ss = 0;
  for (int k = lane; k < d; k += 32) {
    const A v = src.template get<A>(i, k);
    ss += v * v;
    o[k] = Cvt<T>::from_f(v);
  }
  for (int o2 = 16; o2 > 0; o2 >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o2);
  const A inv = normalize ? A(1) / fmax(sqrt(ss), A(1e-12)) : A(1);
  for (int k = lane; k < ldu; k += 32) o[k] = Cvt<T>::from_f(k < d ? ld<T, A>(o + k) * inv : A(0));
  if (rowreg) {
    // A separate loop: fused with the first one, the float64 AdaSSL-V instance spills on sm_90a.
    A rg = 0;
    for (int k = lane; k < d; k += 32) rg += src.template reg<A>(i, k);
    for (int o2 = 16; o2 > 0; o2 >>= 1) rg += __shfl_xor_sync(0xffffffffu, rg, o2);
    if (lane == 0) rowreg[i] = rg;
  }
}

// The core, scalar version, on the normalised rows (S_ij = scale / tau * <u_i, v_j>). MODE kFwd:
// owned = u, streamed = v -> lse, row loss. kRow: owned = u, streamed = v -> g_out = dL/du (n_own x d,
// accumulated in place: zero it first) and per-block partials of sum G * C. kCol: owned = v, streamed = u
// -> g_out = dL/dv. own / str are contiguous with row stride ldu. Every output element is owned by one
// thread and updated in a fixed order: deterministic.
template <class T, class A, int MODE>
__global__ void
    generic_core_kernel(const T* own, const T* str, int64_t n_own, int64_t n_str, int d, int ldu,
                        const int64_t* pos, const int64_t* excl, const A* lse_in, const A* scale_p,
                        const A* gl_p, A inv_temp, A clampv, A inv_m, A* out_lse, A* out_rowloss, A* g_out,
                        A* part_out) {
  __shared__ A Os[kGT][kGK + 1];
  __shared__ A Ss[kGT][kGK + 1];
  __shared__ A Gs[kGT][kGT + 1];
  __shared__ A red[kGThreads];
  const int tid = threadIdx.x, tr = tid >> 3, tc = tid & 7;
  const int64_t o0 = static_cast<int64_t>(blockIdx.x) * kGT;
  const int64_t oi = o0 + tr;
  const bool ovalid = oi < n_own;
  const A alpha = *scale_p * inv_temp;
  const A gfac = (MODE == kFwd) ? A(0) : *gl_p * inv_m;  // host-side 1/M: no division slow path
  int64_t opos = -2, oexc = -2;
  A olse = 0;
  if (MODE != kCol && ovalid) {
    opos = pos[oi];
    oexc = excl[oi];
    if (MODE == kRow) olse = lse_in[oi];
  }
  LseState<A> st = lse_empty<A>();
  A spos = 0, dpart = 0;

  for (int64_t s0 = 0; s0 < n_str; s0 += kGT) {
    A acc[4] = {0, 0, 0, 0};
    for (int k0 = 0; k0 < d; k0 += kGK) {
      for (int e = tid; e < kGT * kGK; e += kGThreads) {
        int r = e / kGK, k = e % kGK;
        bool kv = k0 + k < d;
        Os[r][k] = (o0 + r < n_own && kv) ? ld<T, A>(own + (o0 + r) * ldu + k0 + k) : A(0);
        Ss[r][k] = (s0 + r < n_str && kv) ? ld<T, A>(str + (s0 + r) * ldu + k0 + k) : A(0);
      }
      __syncthreads();
#pragma unroll 4
      for (int k = 0; k < kGK; ++k) {
        A a = Os[tr][k];
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[q] += a * Ss[tc + 8 * q][k];
      }
      __syncthreads();
    }
    // Park the dot products in shared memory (each thread its own slots, no barrier needed) so the
    // element loop below never indexes a register array with a run-time index (local-memory spill).
#pragma unroll
    for (int q = 0; q < 4; ++q) Gs[tr][tc + 8 * q] = acc[q];
    for (int q = 0; q < 4; ++q) {
      const int64_t sj = s0 + tc + 8 * q;
      const bool valid = ovalid && sj < n_str;
      A gv = 0;
      if (valid) {
        const A cosv = Gs[tr][tc + 8 * q];
        const A S = alpha * cosv;
        const A Sc = clamp_logit(S, clampv);
        const int64_t j = (MODE == kCol) ? oi : sj;  // targ column
        if (MODE == kFwd) {
          if (j == opos) spos = Sc;
          if (j != oexc) st = lse_push(st, Sc);
        } else {
          int64_t pi = opos, ei = oexc;
          A li = olse;
          if (MODE == kCol) {
            pi = pos[sj];
            ei = excl[sj];
            li = lse_in[sj];
          }
          const A P = (j == ei) ? A(0) : exp(Sc - li);
          gv = gfac * (P - (j == pi ? A(1) : A(0))) * clamp_pass(S, clampv);
          if (MODE == kRow) dpart += gv * cosv;
        }
      }
      Gs[tr][tc + 8 * q] = gv;
    }
    if (MODE != kFwd) {
      // g_out[o][k] += alpha * sum_s G[o][s] * x_s[k]  (x = the streamed normalised rows)
      for (int k0 = 0; k0 < d; k0 += kGK) {
        for (int e = tid; e < kGT * kGK; e += kGThreads) {
          int r = e / kGK, k = e % kGK;
          Ss[r][k] = (s0 + r < n_str && k0 + k < d) ? ld<T, A>(str + (s0 + r) * ldu + k0 + k) : A(0);
        }
        __syncthreads();
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int k = tc + 8 * q;
          A sum = 0;
#pragma unroll 8
          for (int s = 0; s < kGT; ++s) sum += Gs[tr][s] * Ss[s][k];
          if (ovalid && k0 + k < d) g_out[oi * d + k0 + k] += alpha * sum;
        }
        __syncthreads();
      }
    }
  }

  if (MODE == kFwd) {
    // Merge the 8 partial states of this row (lanes tr*8 .. tr*8+7) in a fixed tree.
    for (int o = 1; o < 8; o <<= 1) {
      LseState<A> other{__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.s, o)};
      st = lse_merge(st, other);
      spos += __shfl_xor_sync(0xffffffffu, spos, o);
    }
    if (tc == 0 && ovalid) {
      A l = lse_value(st);
      out_lse[oi] = l;
      out_rowloss[oi] = l - spos;
    }
  }
  if (MODE == kRow) {
    red[tid] = dpart;
    __syncthreads();
    for (int o = kGThreads / 2; o > 0; o >>= 1) {
      if (tid < o) red[tid] += red[tid + o];
      __syncthreads();
    }
    if (tid == 0) part_out[blockIdx.x] = red[0];
  }
}

// Deterministic single-block sum: out[0] = factor * sum x[0..n).
template <class A>
__global__ void __launch_bounds__(1024) sum_kernel(const A* x, int64_t n, A factor, A* out) {
  __shared__ A red[1024];
  A s = 0;
  for (int64_t i = threadIdx.x; i < n; i += 1024) s += x[i];
  red[threadIdx.x] = s;
  __syncthreads();
  for (int o = 512; o > 0; o >>= 1) {
    if (threadIdx.x < o) red[threadIdx.x] += red[threadIdx.x + o];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = red[0] * factor;
}

// Normalisation backward: dx_i = (g_i - (u_i . g_i) u_i) / n_i, or g_i / eps when ||x_i|| < eps; dx_i = g_i
// for rows taken as given (normalize = false). One warp per row.
template <class T, class A, class Src>
__global__ void __launch_bounds__(256)
    norm_backward_kernel(Src src, int64_t rows, int d, const A* g, T* out, bool normalize) {
  int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  int lane = threadIdx.x & 31;
  if (i >= rows) return;
  const A* gi = g + i * d;
  A ss = 0, dot = 0;
  for (int k = lane; k < d; k += 32) {
    A v = src.template get<A>(i, k);
    ss += v * v;
    dot += v * gi[k];
  }
  for (int o = 16; o > 0; o >>= 1) {
    ss += __shfl_xor_sync(0xffffffffu, ss, o);
    dot += __shfl_xor_sync(0xffffffffu, dot, o);
  }
  const A n = sqrt(ss);
  const bool tiny = normalize && n < A(1e-12);
  const A rn = normalize ? A(1) / fmax(n, A(1e-12)) : A(1);
  const A udot = normalize ? dot * rn : A(0);  // u . g (0: no projection for rows as given)
  for (int k = lane; k < d; k += 32) {
    A v = src.template get<A>(i, k);
    A r = tiny ? gi[k] * rn : (gi[k] - udot * v * rn) * rn;
    out[i * d + k] = Cvt<T>::from_f(r);
  }
}

// AdaSSL: normalisation backward of the four rows that touch pair b (none for rows taken as given,
// normalize = false), then the chain rule into emb_x, emb_y, post_*, prior_* (docs/spec.md 3.3, 3.4, 3.6),
// plus the regulariser gradient. One warp per b.
template <class T, class A, int VAR>
__global__ void __launch_bounds__(256)
    ada_backward_kernel(AdaRows<T, VAR> src, const A* gU, const A* gV, const A* grad_reg_p, T* demb_x,
                        T* demb_y, T* dpost_xy, T* dpost_yx, T* dprior_xy, T* dprior_yx, bool normalize) {
  const int64_t B = src.B;
  const int d = src.d;
  int64_t b = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  int lane = threadIdx.x & 31;
  if (b >= B) return;
  PlainRows<T> targ{src.emb_x, src.emb_y, B, d};
  // rows: 0 = cont b (emb_y + r_yx), 1 = cont B+b (emb_x + r_xy), 2 = targ b (emb_x), 3 = targ B+b (emb_y)
  const int64_t ridx[4] = {b, B + b, b, B + b};
  const A* g[4] = {gU + b * d, gU + (B + b) * d, gV + b * d, gV + (B + b) * d};
  A ss[4] = {0, 0, 0, 0}, dot[4] = {0, 0, 0, 0};
  for (int k = lane; k < d; k += 32) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      A v = q < 2 ? src.template get<A>(ridx[q], k) : targ.template get<A>(ridx[q], k);
      ss[q] += v * v;
      dot[q] += v * g[q][k];
    }
  }
  A rn[4], udot[4];
  bool tiny[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    for (int o = 16; o > 0; o >>= 1) {
      ss[q] += __shfl_xor_sync(0xffffffffu, ss[q], o);
      dot[q] += __shfl_xor_sync(0xffffffffu, dot[q], o);
    }
    A n = sqrt(ss[q]);
    tiny[q] = normalize && n < A(1e-12);
    rn[q] = normalize ? A(1) / fmax(n, A(1e-12)) : A(1);
    udot[q] = normalize ? dot[q] * rn[q] : A(0);
  }
  const A c = *grad_reg_p / static_cast<A>(2 * B);
  for (int k = lane; k < d; k += 32) {
    A dx[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      A v = q < 2 ? src.template get<A>(ridx[q], k) : targ.template get<A>(ridx[q], k);
      dx[q] = tiny[q] ? g[q][k] * rn[q] : (g[q][k] - udot[q] * v * rn[q]) * rn[q];
    }
    demb_y[b * d + k] = Cvt<T>::from_f(dx[0] + dx[3]);
    demb_x[b * d + k] = Cvt<T>::from_f(dx[1] + dx[2]);
#pragma unroll
    for (int dir = 0; dir < 2; ++dir) {
      // dir 0: cont row b <- post_yx / noise_yx; dir 1: cont row B+b <- post_xy / noise_xy
      auto s = src.sel(ridx[dir]);
      T* dpost = (dir == 0 ? dpost_yx : dpost_xy) + b * 2 * d;
      const A dr = dx[dir];
      const A p0 = ld<T, A>(s.post + k), p1 = ld<T, A>(s.post + d + k), nz = ld<T, A>(s.noise + k);
      if (VAR == kVarV) {
        T* dprior = (dir == 0 ? dprior_yx : dprior_xy) + b * 2 * d;
        KlGrad<A> kg = gauss_kl_grad<A>(p0, p1, ld<T, A>(s.prior + k), ld<T, A>(s.prior + d + k), c);
        dpost[k] = Cvt<T>::from_f(dr + kg.mu_q);
        dpost[d + k] = Cvt<T>::from_f(dr * gauss_sample_grad_a<A>(p1, nz) + kg.a_q);
        dprior[k] = Cvt<T>::from_f(kg.mu_p);
        dprior[d + k] = Cvt<T>::from_f(kg.a_p);
      } else {
        dpost[k] = Cvt<T>::from_f(dr * p1 * st_mask_grad<A>(p0, nz) + c * l0_grad<A>(p0));
        dpost[d + k] = Cvt<T>::from_f(dr * st_mask<A>(p0, nz));
      }
    }
  }
}

}  // namespace adassl
