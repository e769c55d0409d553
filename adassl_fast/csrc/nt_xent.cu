// extern "C" launchers of the nt_xent core (nt_xent, info_nce): forward and deterministic backward.
#include "adassl_launch.cuh"

using namespace adassl;

extern "C" {

const char* adassl_cuda_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

// esize: bytes of the accumulation type (4 or 8); tsize: bytes of the input type (the u / v scratch).
int64_t adassl_cuda_workspace_bytes(int64_t M, int64_t N, int d, int esize, int tsize, int backward) {
  return carve(nullptr, M, N, d, esize, tsize, backward != 0).bytes;
}

int adassl_cuda_nt_xent_forward(int dtype, const void* cont, const void* targ, int64_t M, int64_t N, int d,
                                const int64_t* pos, const int64_t* excl, const void* scale, double inv_temp,
                                double clamp, int normalize, void* loss, void* lse, void* ws, int64_t stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const bool unit_rows = normalize != 0;
  switch (dtype) {
    case kF32:
      return nt_xent_forward_t<float, float>(cont, targ, M, N, d, pos, excl, scale, inv_temp, clamp, unit_rows,
                                             loss, lse, ws, s);
    case kF64:
      return nt_xent_forward_t<double, double>(cont, targ, M, N, d, pos, excl, scale, inv_temp, clamp, unit_rows,
                                               loss, lse, ws, s);
    case kBF16:
      return nt_xent_forward_t<__nv_bfloat16, float>(cont, targ, M, N, d, pos, excl, scale, inv_temp, clamp,
                                                     unit_rows, loss, lse, ws, s);
    case kF16:
      return nt_xent_forward_t<__half, float>(cont, targ, M, N, d, pos, excl, scale, inv_temp, clamp, unit_rows,
                                              loss, lse, ws, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int adassl_cuda_nt_xent_backward(int dtype, const void* grad_loss, const void* cont, const void* targ,
                                 int64_t M, int64_t N, int d, const int64_t* pos, const int64_t* excl,
                                 const void* scale, const void* lse, double inv_temp, double clamp, int normalize,
                                 void* dcont, void* dtarg, void* dscale, void* ws, int64_t stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const bool unit_rows = normalize != 0;
  switch (dtype) {
    case kF32:
      return nt_xent_backward_t<float, float>(grad_loss, cont, targ, M, N, d, pos, excl, scale, lse, inv_temp,
                                              clamp, unit_rows, dcont, dtarg, dscale, ws, s);
    case kF64:
      return nt_xent_backward_t<double, double>(grad_loss, cont, targ, M, N, d, pos, excl, scale, lse,
                                                inv_temp, clamp, unit_rows, dcont, dtarg, dscale, ws, s);
    case kBF16:
      return nt_xent_backward_t<__nv_bfloat16, float>(grad_loss, cont, targ, M, N, d, pos, excl, scale, lse,
                                                      inv_temp, clamp, unit_rows, dcont, dtarg, dscale, ws, s);
    case kF16:
      return nt_xent_backward_t<__half, float>(grad_loss, cont, targ, M, N, d, pos, excl, scale, lse,
                                               inv_temp, clamp, unit_rows, dcont, dtarg, dscale, ws, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // extern "C"
