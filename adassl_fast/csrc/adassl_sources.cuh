// Row sources: where the O(M d) kernels (the prologue that writes the normalised rows, the
// normalisation / AdaSSL backward) get row `i`, element `k` of the matrices the op contrasts.
//
// PlainRows: rows of one or two stacked (rows, d) tensors (nt_xent cont / targ; AdaSSL's
// targ = [emb_x; emb_y] without a copy).
// AdaRows: AdaSSL's edited rows cont = [emb_y + r_yx; emb_x + r_xy], formed on the fly from the
// embeddings, the posterior (and prior) outputs and the noise. cont itself is never stored; only its
// normalised rows u (the prologue's scratch buffer, in T) reach the matrix kernels.
//
// get() returns the value rounded to the storage type T and widened to the compute type A, so the
// prologue's norms and the normalisation backward see the same operands.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "adassl_math.cuh"

namespace adassl {

template <class T>
struct Cvt;
template <>
struct Cvt<float> {
  __device__ __forceinline__ static float to_f(float v) { return v; }
  __device__ __forceinline__ static float from_f(float v) { return v; }
};
template <>
struct Cvt<double> {
  __device__ __forceinline__ static double to_f(double v) { return v; }
  __device__ __forceinline__ static double from_f(double v) { return v; }
};

template <>
struct Cvt<__nv_bfloat16> {
  __device__ __forceinline__ static float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Cvt<__half> {
  __device__ __forceinline__ static float to_f(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_f(float v) { return __float2half_rn(v); }
};

template <class T, class A>
__device__ __forceinline__ A ld(const T* p) {
  return static_cast<A>(Cvt<T>::to_f(*p));
}

template <class T, class A>
__device__ __forceinline__ A round_to(A v) {
  return static_cast<A>(Cvt<T>::to_f(Cvt<T>::from_f(v)));
}

template <class T>
struct PlainRows {
  const T* p0;
  const T* p1;
  int64_t split;  // rows < split come from p0, the rest from p1
  int d;
  static constexpr bool kPlain = true;

  __device__ __forceinline__ const T* row_ptr(int64_t i) const {
    return i < split ? p0 + i * d : p1 + (i - split) * d;
  }
  template <class A>
  __device__ __forceinline__ A get(int64_t i, int k) const {
    return ld<T, A>(row_ptr(i) + k);
  }
  template <class A>
  __device__ __forceinline__ A reg(int64_t, int) const {
    return A(0);
  }
};

enum Variant : int { kVarV = 0, kVarS = 1 };

template <class T, int VAR>
struct AdaRows {
  const T* emb_x;
  const T* emb_y;
  const T* post_xy;
  const T* post_yx;
  const T* prior_xy;  // variant V only
  const T* prior_yx;
  const T* noise_xy;
  const T* noise_yx;
  int64_t B;
  int d;
  static constexpr bool kPlain = false;

  // Row i < B is the prediction of x from y: emb_y + r_yx; row B + b is emb_x + r_xy.
  struct Sel {
    const T* emb;
    const T* post;
    const T* prior;
    const T* noise;
  };
  __device__ __forceinline__ Sel sel(int64_t i) const {
    if (i < B) {
      return Sel{emb_y + i * d, post_yx + i * 2 * d, prior_yx ? prior_yx + i * 2 * d : nullptr,
                 noise_yx + i * d};
    }
    int64_t b = i - B;
    return Sel{emb_x + b * d, post_xy + b * 2 * d, prior_xy ? prior_xy + b * 2 * d : nullptr,
               noise_xy + b * d};
  }

  template <class A>
  __device__ __forceinline__ A latent(const Sel& s, int k) const {
    A p0 = ld<T, A>(s.post + k), p1 = ld<T, A>(s.post + d + k), nz = ld<T, A>(s.noise + k);
    if (VAR == kVarV) return gauss_sample<A>(p0, p1, nz);
    return st_mask<A>(p0, nz) * p1;
  }

  template <class A>
  __device__ __forceinline__ A get(int64_t i, int k) const {
    Sel s = sel(i);
    return round_to<T, A>(ld<T, A>(s.emb + k) + latent<A>(s, k));
  }

  // Regulariser contribution of element k of row i (KL for V, sigmoid(logits) for S).
  template <class A>
  __device__ __forceinline__ A reg(int64_t i, int k) const {
    Sel s = sel(i);
    A p0 = ld<T, A>(s.post + k), p1 = ld<T, A>(s.post + d + k);
    if (VAR == kVarV) return gauss_kl<A>(p0, p1, ld<T, A>(s.prior + k), ld<T, A>(s.prior + d + k));
    return l0_term<A>(p0);
  }
};

}  // namespace adassl
