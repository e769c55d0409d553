// extern "C" launchers of the one-pass AdaSSL op (variants "v" and "s"): forward and backward.
#include "adassl_launch.cuh"

using namespace adassl;

namespace {

template <class T, class A>
int fwd_v(int variant, const AdaPtrs& p, int64_t B, int d, const int64_t* pos, const int64_t* excl,
          const void* scale, double it, double cl, bool nm, void* l_ssl, void* l_reg, void* lse, void* ws,
          cudaStream_t s) {
  if (variant == kVarV) return adassl_forward_t<T, A, kVarV>(p, B, d, pos, excl, scale, it, cl, nm, l_ssl, l_reg, lse, ws, s);
  return adassl_forward_t<T, A, kVarS>(p, B, d, pos, excl, scale, it, cl, nm, l_ssl, l_reg, lse, ws, s);
}

template <class T, class A>
int bwd_v(int variant, const void* gs, const void* gr, const AdaPtrs& p, int64_t B, int d, const int64_t* pos,
          const int64_t* excl, const void* scale, const void* lse, double it, double cl, bool nm,
          void* const* outs, void* ws, cudaStream_t s) {
  if (variant == kVarV) {
    return adassl_backward_t<T, A, kVarV>(gs, gr, p, B, d, pos, excl, scale, lse, it, cl, nm, outs[0], outs[1],
                                          outs[2], outs[3], outs[4], outs[5], outs[6], ws, s);
  }
  return adassl_backward_t<T, A, kVarS>(gs, gr, p, B, d, pos, excl, scale, lse, it, cl, nm, outs[0], outs[1],
                                        outs[2], outs[3], outs[4], outs[5], outs[6], ws, s);
}

}  // namespace

extern "C" {

// ins: emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx (prior_* null for "s").
int adassl_cuda_adassl_forward(int dtype, int variant, const void* const* ins, int64_t B, int d,
                               const int64_t* pos, const int64_t* excl, const void* scale, double inv_temp,
                               double clamp, int normalize, void* l_ssl, void* l_reg, void* lse, void* ws,
                               int64_t stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  AdaPtrs p{ins[0], ins[1], ins[2], ins[3], ins[4], ins[5], ins[6], ins[7]};
  const bool nm = normalize != 0;
  switch (dtype) {
    case kF32: return fwd_v<float, float>(variant, p, B, d, pos, excl, scale, inv_temp, clamp, nm, l_ssl, l_reg, lse, ws, s);
    case kF64: return fwd_v<double, double>(variant, p, B, d, pos, excl, scale, inv_temp, clamp, nm, l_ssl, l_reg, lse, ws, s);
    case kBF16: return fwd_v<__nv_bfloat16, float>(variant, p, B, d, pos, excl, scale, inv_temp, clamp, nm, l_ssl, l_reg, lse, ws, s);
    case kF16: return fwd_v<__half, float>(variant, p, B, d, pos, excl, scale, inv_temp, clamp, nm, l_ssl, l_reg, lse, ws, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

// outs: demb_x, demb_y, dpost_xy, dpost_yx, dprior_xy, dprior_yx (null for "s"), dscale.
int adassl_cuda_adassl_backward(int dtype, int variant, const void* grad_ssl, const void* grad_reg,
                                const void* const* ins, int64_t B, int d, const int64_t* pos,
                                const int64_t* excl, const void* scale, const void* lse, double inv_temp,
                                double clamp, int normalize, void* const* outs, void* ws, int64_t stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  AdaPtrs p{ins[0], ins[1], ins[2], ins[3], ins[4], ins[5], ins[6], ins[7]};
  const bool nm = normalize != 0;
  switch (dtype) {
    case kF32: return bwd_v<float, float>(variant, grad_ssl, grad_reg, p, B, d, pos, excl, scale, lse, inv_temp, clamp, nm, outs, ws, s);
    case kF64: return bwd_v<double, double>(variant, grad_ssl, grad_reg, p, B, d, pos, excl, scale, lse, inv_temp, clamp, nm, outs, ws, s);
    case kBF16: return bwd_v<__nv_bfloat16, float>(variant, grad_ssl, grad_reg, p, B, d, pos, excl, scale, lse, inv_temp, clamp, nm, outs, ws, s);
    case kF16: return bwd_v<__half, float>(variant, grad_ssl, grad_reg, p, B, d, pos, excl, scale, lse, inv_temp, clamp, nm, outs, ws, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // extern "C"
