// Host-side launch sequences shared by nt_xent.cu and adassl.cu. Each op is a short fixed sequence of
// kernels on one stream: the prologue that writes the normalised rows u / v (O(M d); AdaSSL's edited
// rows and regulariser are formed only here), the core passes on u / v (O(M N d), the same kernels for
// nt_xent and AdaSSL), deterministic reductions and the O(M d) backward epilogue. Workspace is one byte buffer the binding allocates (size from
// adassl_cuda_workspace_bytes).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "adassl_generic.cuh"
#include "adassl_mma.cuh"

namespace adassl {

enum DType : int { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };

inline int64_t align_up(int64_t x) { return (x + 255) / 256 * 256; }

// Workspace layout: rowloss (M), rowreg (M), partials (M / 16 + 2), [gU (M d), gV (N d)] in the
// accumulation type A (esize bytes), then the normalised rows u (M x ldu) and v (N x ldu) in the input
// type T (tsize bytes), ldu = pad_cols(d). Every piece starts on a 256-byte boundary.
struct Ws {
  void* rowloss;
  void* rowreg;
  void* part;
  void* gU;
  void* gV;
  void* u;
  void* v;
  int64_t bytes;
};

inline Ws carve(void* base, int64_t M, int64_t N, int d, int esize, int tsize, bool backward) {
  Ws w{};
  char* p = static_cast<char*>(base);
  int64_t off = 0;
  auto take = [&](int64_t n, int size) {
    void* r = p ? p + off : nullptr;
    off += align_up(n * size);
    return r;
  };
  const int64_t ldu = pad_cols(d);
  w.rowloss = take(M, esize);
  w.rowreg = take(M, esize);
  w.part = take(M / 16 + 2, esize);
  if (backward) {
    w.gU = take(M * d, esize);
    w.gV = take(N * d, esize);
  }
  w.u = take(M * ldu, tsize);
  w.v = take(N * ldu, tsize);
  w.bytes = off;
  return w;
}

inline unsigned blocks_for(int64_t work, int per_block) {
  return static_cast<unsigned>((work + per_block - 1) / per_block);
}

// Runs one core pass (MODE) over the normalised rows (the rows as given: normalize = false) with the best
// kernel available for (T, d); returns the number of blocks that wrote partials (kRow). The tensor-core
// kernels overwrite g_out, the generic kernel accumulates into it (zeroed here).
template <class T, class A, int MODE>
int64_t run_core(cudaStream_t s, const T* own, const T* str, int64_t n_own, int64_t n_str, int d,
                 const int64_t* pos, const int64_t* excl, const A* lse_in, const A* scale_p, const A* gl_p,
                 A inv_temp, A clampv, A inv_m, A* out_lse, A* out_rowloss, A* g_out, A* part_out, bool normalize) {
  const int ldu = pad_cols(d);
  if constexpr (MmaTraits<T>::kOk) {
    if (d <= 128) {
      // A bound on |<u_i, v_j>| for the kernels' clamp skip: (1 + 2^-8)^2 (1 + 1e-5) < 1.01 for unit rows
      // rounded to bf16 / fp16 (fp32 norms and accumulation); none for rows taken as given, unless no clamp
      // is set (clampv = inf), which nothing reaches.
      const float cos_bound = normalize || std::isinf(static_cast<double>(clampv)) ? 1.02f : INFINITY;
      return run_mma_core<T, MODE>(s, own, str, n_own, n_str, d, ldu, pos, excl, lse_in, scale_p, gl_p, inv_temp,
                                   clampv, inv_m, out_lse, out_rowloss, g_out, part_out, cos_bound);
    }
  }
  if (MODE != kFwd && n_own > 0) cudaMemsetAsync(g_out, 0, sizeof(A) * n_own * d, s);
  unsigned nb = blocks_for(n_own, kGT);
  if (nb == 0) return 0;
  generic_core_kernel<T, A, MODE><<<nb, kGThreads, 0, s>>>(own, str, n_own, n_str, d, ldu, pos, excl, lse_in,
                                                           scale_p, gl_p, inv_temp, clampv, inv_m, out_lse,
                                                           out_rowloss, g_out, part_out);
  return nb;
}

// The prologue: normalised rows of src (or the rows as given) into the contiguous buffer out (+ the
// regulariser per row).
template <class T, class A, class Src>
void launch_prep(cudaStream_t s, Src src, int64_t rows, int d, T* out, A* rowreg, bool normalize) {
  if (rows == 0) return;
  prep_rows_kernel<T, A, Src><<<blocks_for(rows, 8), 256, 0, s>>>(src, rows, d, pad_cols(d), out, rowreg, normalize);
}

// The forward every op shares: both sides' normalised rows (and the regulariser per row, when rowreg is
// given), the row LSE pass, and the loss as the mean of the per-row terms.
template <class T, class A, class RowsC, class RowsT>
void core_forward(cudaStream_t s, const Ws& w, const RowsC& C, const RowsT& Tg, int64_t M, int64_t N, int d,
                  const int64_t* pos, const int64_t* excl, const void* scale, double inv_temp, double clamp,
                  bool normalize, A* rowreg, void* loss, void* lse) {
  launch_prep<T, A>(s, C, M, d, static_cast<T*>(w.u), rowreg, normalize);
  launch_prep<T, A>(s, Tg, N, d, static_cast<T*>(w.v), static_cast<A*>(nullptr), normalize);
  run_core<T, A, kFwd>(s, static_cast<const T*>(w.u), static_cast<const T*>(w.v), M, N, d, pos, excl, nullptr,
                       static_cast<const A*>(scale), nullptr, A(inv_temp), A(clamp), A(1) / A(M),
                       static_cast<A*>(lse), static_cast<A*>(w.rowloss), nullptr, nullptr, normalize);
  sum_kernel<A><<<1, 1024, 0, s>>>(static_cast<A*>(w.rowloss), M, A(1) / A(M), static_cast<A*>(loss));
}

// The backward every op shares: the normalised rows again, the row pass (fp32 gradient w.r.t. u into w.gU,
// dscale partials) and the column pass (w.r.t. v into w.gV), dscale summed. The caller's O(M d) kernel
// turns w.gU / w.gV into its own gradients.
template <class T, class A, class RowsC, class RowsT>
void core_backward(cudaStream_t s, const Ws& w, const RowsC& C, const RowsT& Tg, int64_t M, int64_t N, int d,
                   const int64_t* pos, const int64_t* excl, const void* scale, const void* grad_loss,
                   const void* lse, double inv_temp, double clamp, bool normalize, void* dscale) {
  const T* U = static_cast<const T*>(w.u);
  const T* V = static_cast<const T*>(w.v);
  launch_prep<T, A>(s, C, M, d, static_cast<T*>(w.u), static_cast<A*>(nullptr), normalize);
  launch_prep<T, A>(s, Tg, N, d, static_cast<T*>(w.v), static_cast<A*>(nullptr), normalize);
  const A* sc = static_cast<const A*>(scale);
  const A* gl = static_cast<const A*>(grad_loss);
  const A* lse_a = static_cast<const A*>(lse);
  A* part = static_cast<A*>(w.part);
  int64_t nb = run_core<T, A, kRow>(s, U, V, M, N, d, pos, excl, lse_a, sc, gl, A(inv_temp), A(clamp), A(1) / A(M),
                                    nullptr, nullptr, static_cast<A*>(w.gU), part, normalize);
  run_core<T, A, kCol>(s, V, U, N, M, d, pos, excl, lse_a, sc, gl, A(inv_temp), A(clamp), A(1) / A(M), nullptr,
                       nullptr, static_cast<A*>(w.gV), nullptr, normalize);
  sum_kernel<A><<<1, 1024, 0, s>>>(part, nb, A(inv_temp), static_cast<A*>(dscale));
}

template <class T, class A>
int nt_xent_forward_t(const void* cont, const void* targ, int64_t M, int64_t N, int d, const int64_t* pos,
                      const int64_t* excl, const void* scale, double inv_temp, double clamp, bool normalize,
                      void* loss, void* lse, void* ws, cudaStream_t s) {
  Ws w = carve(ws, M, N, d, sizeof(A), sizeof(T), false);
  PlainRows<T> C{static_cast<const T*>(cont), static_cast<const T*>(cont), M, d};
  PlainRows<T> Tg{static_cast<const T*>(targ), static_cast<const T*>(targ), N, d};
  core_forward<T, A>(s, w, C, Tg, M, N, d, pos, excl, scale, inv_temp, clamp, normalize, static_cast<A*>(nullptr),
                     loss, lse);
  return static_cast<int>(cudaGetLastError());
}

template <class T, class A>
int nt_xent_backward_t(const void* grad_loss, const void* cont, const void* targ, int64_t M, int64_t N, int d,
                       const int64_t* pos, const int64_t* excl, const void* scale, const void* lse,
                       double inv_temp, double clamp, bool normalize, void* dcont, void* dtarg, void* dscale,
                       void* ws, cudaStream_t s) {
  Ws w = carve(ws, M, N, d, sizeof(A), sizeof(T), true);
  PlainRows<T> C{static_cast<const T*>(cont), static_cast<const T*>(cont), M, d};
  PlainRows<T> Tg{static_cast<const T*>(targ), static_cast<const T*>(targ), N, d};
  core_backward<T, A>(s, w, C, Tg, M, N, d, pos, excl, scale, grad_loss, lse, inv_temp, clamp, normalize, dscale);
  const A* gU = static_cast<const A*>(w.gU);
  const A* gV = static_cast<const A*>(w.gV);
  if (M > 0) {
    norm_backward_kernel<T, A, PlainRows<T>>
        <<<blocks_for(M, 8), 256, 0, s>>>(C, M, d, gU, static_cast<T*>(dcont), normalize);
  }
  if (N > 0) {
    norm_backward_kernel<T, A, PlainRows<T>>
        <<<blocks_for(N, 8), 256, 0, s>>>(Tg, N, d, gV, static_cast<T*>(dtarg), normalize);
  }
  return static_cast<int>(cudaGetLastError());
}

struct AdaPtrs {
  const void* emb_x;
  const void* emb_y;
  const void* post_xy;
  const void* post_yx;
  const void* prior_xy;
  const void* prior_yx;
  const void* noise_xy;
  const void* noise_yx;
};

template <class T, int VAR>
AdaRows<T, VAR> make_ada(const AdaPtrs& p, int64_t B, int d) {
  return AdaRows<T, VAR>{static_cast<const T*>(p.emb_x),    static_cast<const T*>(p.emb_y),
                         static_cast<const T*>(p.post_xy),  static_cast<const T*>(p.post_yx),
                         static_cast<const T*>(p.prior_xy), static_cast<const T*>(p.prior_yx),
                         static_cast<const T*>(p.noise_xy), static_cast<const T*>(p.noise_yx),
                         B,
                         d};
}

template <class T, class A, int VAR>
int adassl_forward_t(const AdaPtrs& p, int64_t B, int d, const int64_t* pos, const int64_t* excl,
                     const void* scale, double inv_temp, double clamp, bool normalize, void* l_ssl, void* l_reg,
                     void* lse, void* ws, cudaStream_t s) {
  const int64_t M = 2 * B;
  Ws w = carve(ws, M, M, d, sizeof(A), sizeof(T), false);
  AdaRows<T, VAR> C = make_ada<T, VAR>(p, B, d);
  PlainRows<T> Tg{static_cast<const T*>(p.emb_x), static_cast<const T*>(p.emb_y), B, d};
  core_forward<T, A>(s, w, C, Tg, M, M, d, pos, excl, scale, inv_temp, clamp, normalize, static_cast<A*>(w.rowreg),
                     l_ssl, lse);
  sum_kernel<A><<<1, 1024, 0, s>>>(static_cast<A*>(w.rowreg), M, A(1) / A(M), static_cast<A*>(l_reg));
  return static_cast<int>(cudaGetLastError());
}

template <class T, class A, int VAR>
int adassl_backward_t(const void* grad_ssl, const void* grad_reg, const AdaPtrs& p, int64_t B, int d,
                      const int64_t* pos, const int64_t* excl, const void* scale, const void* lse,
                      double inv_temp, double clamp, bool normalize, void* demb_x, void* demb_y, void* dpost_xy,
                      void* dpost_yx, void* dprior_xy, void* dprior_yx, void* dscale, void* ws,
                      cudaStream_t s) {
  const int64_t M = 2 * B;
  Ws w = carve(ws, M, M, d, sizeof(A), sizeof(T), true);
  AdaRows<T, VAR> C = make_ada<T, VAR>(p, B, d);
  PlainRows<T> Tg{static_cast<const T*>(p.emb_x), static_cast<const T*>(p.emb_y), B, d};
  core_backward<T, A>(s, w, C, Tg, M, M, d, pos, excl, scale, grad_ssl, lse, inv_temp, clamp, normalize, dscale);
  const A* gU = static_cast<const A*>(w.gU);
  const A* gV = static_cast<const A*>(w.gV);
  if (B > 0) {
    ada_backward_kernel<T, A, VAR><<<blocks_for(B, 8), 256, 0, s>>>(
        C, gU, gV, static_cast<const A*>(grad_reg), static_cast<T*>(demb_x), static_cast<T*>(demb_y),
        static_cast<T*>(dpost_xy), static_cast<T*>(dpost_yx), static_cast<T*>(dprior_xy),
        static_cast<T*>(dprior_yx), normalize);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace adassl
