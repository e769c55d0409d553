// Thin torch binding of the CUDA kernels: checks, allocation, and a call into the extern "C" launchers
// that nvcc compiled separately (csrc/nt_xent.cu, csrc/adassl.cu). Includes only <torch/extension.h>, so
// it builds against any torch (the CPU wheel too); the stream comes in as an integer.
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

extern "C" {
const char* adassl_cuda_error_string(int err);
int64_t adassl_cuda_workspace_bytes(int64_t M, int64_t N, int d, int esize, int tsize, int backward);
int adassl_cuda_nt_xent_forward(int dtype, const void* cont, const void* targ, int64_t M, int64_t N, int d,
                                const int64_t* pos, const int64_t* excl, const void* scale, double inv_temp,
                                double clamp, int normalize, void* loss, void* lse, void* ws, int64_t stream);
int adassl_cuda_nt_xent_backward(int dtype, const void* grad_loss, const void* cont, const void* targ,
                                 int64_t M, int64_t N, int d, const int64_t* pos, const int64_t* excl,
                                 const void* scale, const void* lse, double inv_temp, double clamp, int normalize,
                                 void* dcont, void* dtarg, void* dscale, void* ws, int64_t stream);
int adassl_cuda_adassl_forward(int dtype, int variant, const void* const* ins, int64_t B, int d,
                               const int64_t* pos, const int64_t* excl, const void* scale, double inv_temp,
                               double clamp, int normalize, void* l_ssl, void* l_reg, void* lse, void* ws,
                               int64_t stream);
int adassl_cuda_adassl_backward(int dtype, int variant, const void* grad_ssl, const void* grad_reg,
                                const void* const* ins, int64_t B, int d, const int64_t* pos,
                                const int64_t* excl, const void* scale, const void* lse, double inv_temp,
                                double clamp, int normalize, void* const* outs, void* ws, int64_t stream);
}

namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return 0;
    case at::kDouble:
      return 1;
    case at::kBFloat16:
      return 2;
    case at::kHalf:
      return 3;
    default:
      TORCH_CHECK(false, "adassl_fast cuda: unsupported dtype ", t, " (float16, bfloat16, float32, float64)");
  }
  return -1;
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "adassl_fast cuda: ", what, " failed: ", adassl_cuda_error_string(err));
}

void check_rows(const torch::Tensor& x, const char* name, const torch::Tensor& like, int64_t cols) {
  TORCH_CHECK(x.is_cuda(), "adassl_fast cuda: ", name, " must be a CUDA tensor");
  TORCH_CHECK(x.device() == like.device(), "adassl_fast cuda: ", name, " is on ", x.device(), ", expected ",
              like.device());
  TORCH_CHECK(x.scalar_type() == like.scalar_type(), "adassl_fast cuda: ", name, " has dtype ", x.scalar_type(),
              ", expected ", like.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == cols, "adassl_fast cuda: ", name, " must have shape (rows, ", cols,
              "), got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "adassl_fast cuda: ", name, " must be contiguous");
}

// A 0-dim scalar on the inputs' device in the accumulation dtype.
torch::Tensor scalar_arg(const torch::Tensor& x, const char* name, const torch::Tensor& like) {
  TORCH_CHECK(x.numel() == 1, "adassl_fast cuda: ", name, " must be a 0-dim tensor");
  TORCH_CHECK(x.device() == like.device(), "adassl_fast cuda: ", name, " is on ", x.device(), ", expected ",
              like.device());
  return x.reshape({}).to(acc_type(like.scalar_type())).contiguous();
}

// The forward's per-row LSE handed back to the backward: (rows,) in the accumulation dtype, contiguous.
torch::Tensor lse_arg(const torch::Tensor& lse, const torch::Tensor& like, int64_t rows, const char* shape) {
  auto at = acc_type(like.scalar_type());
  TORCH_CHECK(lse.device() == like.device() && lse.scalar_type() == at && lse.dim() == 1 && lse.size(0) == rows,
              "adassl_fast cuda: lse must be ", shape, " ", at, " on ", like.device());
  return lse.contiguous();
}

void check_index(const torch::Tensor& x, const char* name, const torch::Tensor& like, int64_t M) {
  TORCH_CHECK(x.device() == like.device(), "adassl_fast cuda: ", name, " must be on ", like.device());
  TORCH_CHECK(x.scalar_type() == at::kLong && x.dim() == 1 && x.size(0) == M && x.is_contiguous(),
              "adassl_fast cuda: ", name, " must be a contiguous int64 tensor of shape (", M, ",)");
}

double clamp_value(c10::optional<double> clamp) {
  return clamp.has_value() ? *clamp : std::numeric_limits<double>::infinity();
}

torch::Tensor workspace(const torch::Tensor& like, int64_t M, int64_t N, int64_t d, bool backward) {
  const int esize = like.scalar_type() == at::kDouble ? 8 : 4;
  const int tsize = static_cast<int>(like.element_size());
  int64_t bytes = adassl_cuda_workspace_bytes(M, N, static_cast<int>(d), esize, tsize, backward ? 1 : 0);
  return torch::empty({bytes}, like.options().dtype(at::kByte));
}

// The nt_xent core's inputs (docs/backends.md): cont (M, d) and targ (N, d) rows alike, pos / excl (M,) int64.
std::tuple<int64_t, int64_t, int64_t> core_shape(const torch::Tensor& cont, const torch::Tensor& targ,
                                                 const torch::Tensor& pos, const torch::Tensor& excl) {
  TORCH_CHECK(cont.dim() == 2, "adassl_fast cuda: cont must be 2-D (M, d)");
  const int64_t M = cont.size(0), d = cont.size(1);
  TORCH_CHECK(d > 0 && d < (int64_t{1} << 20), "adassl_fast cuda: bad feature dim ", d);
  check_rows(cont, "cont", cont, d);
  check_rows(targ, "targ", cont, d);
  check_index(pos, "pos", cont, M);
  check_index(excl, "excl", cont, M);
  return {M, targ.size(0), d};
}

std::vector<torch::Tensor> nt_xent_forward(torch::Tensor cont, torch::Tensor targ, torch::Tensor pos,
                                           torch::Tensor excl, torch::Tensor scale, double inv_temperature,
                                           c10::optional<double> clamp, bool normalize, int64_t stream) {
  const auto [M, N, d] = core_shape(cont, targ, pos, excl);
  auto sc = scalar_arg(scale, "scale", cont);
  auto aopt = cont.options().dtype(acc_type(cont.scalar_type()));
  auto loss = torch::empty({}, aopt);
  auto lse = torch::empty({M}, aopt);
  auto ws = workspace(cont, M, N, d, false);
  check_launch(adassl_cuda_nt_xent_forward(dtype_code(cont.scalar_type()), cont.data_ptr(), targ.data_ptr(), M,
                                           N, static_cast<int>(d), pos.data_ptr<int64_t>(),
                                           excl.data_ptr<int64_t>(), sc.data_ptr(), inv_temperature,
                                           clamp_value(clamp), normalize ? 1 : 0, loss.data_ptr(), lse.data_ptr(),
                                           ws.data_ptr(), stream),
               "nt_xent_forward");
  return {loss, lse};
}

std::vector<torch::Tensor> nt_xent_backward(torch::Tensor grad_loss, torch::Tensor cont, torch::Tensor targ,
                                            torch::Tensor pos, torch::Tensor excl, torch::Tensor scale,
                                            torch::Tensor lse, double inv_temperature, c10::optional<double> clamp,
                                            bool normalize, int64_t stream) {
  const auto [M, N, d] = core_shape(cont, targ, pos, excl);
  auto sc = scalar_arg(scale, "scale", cont);
  auto gl = scalar_arg(grad_loss, "grad_loss", cont);
  auto at = acc_type(cont.scalar_type());
  auto lse_c = lse_arg(lse, cont, M, "(M,)");
  auto dcont = torch::empty_like(cont);
  auto dtarg = torch::empty_like(targ);
  auto dscale = torch::empty({}, cont.options().dtype(at));
  auto ws = workspace(cont, M, N, d, true);
  check_launch(adassl_cuda_nt_xent_backward(dtype_code(cont.scalar_type()), gl.data_ptr(), cont.data_ptr(),
                                            targ.data_ptr(), M, N, static_cast<int>(d), pos.data_ptr<int64_t>(),
                                            excl.data_ptr<int64_t>(), sc.data_ptr(), lse_c.data_ptr(),
                                            inv_temperature, clamp_value(clamp), normalize ? 1 : 0, dcont.data_ptr(),
                                            dtarg.data_ptr(), dscale.data_ptr(), ws.data_ptr(), stream),
               "nt_xent_backward");
  return {dcont, dtarg, dscale.to(scale.scalar_type())};
}

struct AdaInputs {
  int64_t B, d;
  int variant;
  const void* ptrs[8];
  torch::Tensor pos, excl;
};

AdaInputs check_ada(const torch::Tensor& emb_x, const torch::Tensor& emb_y, const torch::Tensor& post_xy,
                    const torch::Tensor& post_yx, const torch::Tensor& prior_xy, const torch::Tensor& prior_yx,
                    const torch::Tensor& noise_xy, const torch::Tensor& noise_yx, const std::string& variant) {
  TORCH_CHECK(variant == "v" || variant == "s", "adassl_fast cuda: variant must be 'v' or 's', got ", variant);
  TORCH_CHECK(emb_x.dim() == 2, "adassl_fast cuda: emb_x must be 2-D (B, d)");
  AdaInputs a;
  a.B = emb_x.size(0);
  a.d = emb_x.size(1);
  a.variant = variant == "v" ? 0 : 1;
  check_rows(emb_x, "emb_x", emb_x, a.d);
  check_rows(emb_y, "emb_y", emb_x, a.d);
  check_rows(post_xy, "post_xy", emb_x, 2 * a.d);
  check_rows(post_yx, "post_yx", emb_x, 2 * a.d);
  check_rows(noise_xy, "noise_xy", emb_x, a.d);
  check_rows(noise_yx, "noise_yx", emb_x, a.d);
  for (const auto* t : {&emb_y, &post_xy, &post_yx, &noise_xy, &noise_yx}) {
    TORCH_CHECK(t->size(0) == a.B, "adassl_fast cuda: every AdaSSL input needs B = ", a.B, " rows");
  }
  const void* pxy = nullptr;
  const void* pyx = nullptr;
  if (a.variant == 0) {
    check_rows(prior_xy, "prior_xy", emb_x, 2 * a.d);
    check_rows(prior_yx, "prior_yx", emb_x, 2 * a.d);
    TORCH_CHECK(prior_xy.size(0) == a.B && prior_yx.size(0) == a.B, "adassl_fast cuda: prior_* need B rows");
    pxy = prior_xy.data_ptr();
    pyx = prior_yx.data_ptr();
  }
  const void* p[8] = {emb_x.data_ptr(), emb_y.data_ptr(), post_xy.data_ptr(), post_yx.data_ptr(),
                      pxy,              pyx,              noise_xy.data_ptr(), noise_yx.data_ptr()};
  for (int i = 0; i < 8; ++i) a.ptrs[i] = p[i];
  const int64_t M = 2 * a.B;
  auto iopt = emb_x.options().dtype(at::kLong);
  a.pos = torch::arange(M, iopt);
  a.excl = torch::remainder(a.pos + a.B, std::max<int64_t>(M, 1));
  return a;
}

std::vector<torch::Tensor> adassl_forward(torch::Tensor emb_x, torch::Tensor emb_y, torch::Tensor post_xy,
                                          torch::Tensor post_yx, torch::Tensor prior_xy, torch::Tensor prior_yx,
                                          torch::Tensor noise_xy, torch::Tensor noise_yx, torch::Tensor scale,
                                          double inv_temperature, c10::optional<double> clamp,
                                          std::string variant, bool normalize, int64_t stream) {
  AdaInputs a = check_ada(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, variant);
  const int64_t M = 2 * a.B;
  auto sc = scalar_arg(scale, "scale", emb_x);
  auto aopt = emb_x.options().dtype(acc_type(emb_x.scalar_type()));
  auto l_ssl = torch::empty({}, aopt);
  auto l_reg = torch::empty({}, aopt);
  auto lse = torch::empty({M}, aopt);
  auto ws = workspace(emb_x, M, M, a.d, false);
  check_launch(adassl_cuda_adassl_forward(dtype_code(emb_x.scalar_type()), a.variant, a.ptrs, a.B,
                                          static_cast<int>(a.d), a.pos.data_ptr<int64_t>(),
                                          a.excl.data_ptr<int64_t>(), sc.data_ptr(), inv_temperature,
                                          clamp_value(clamp), normalize ? 1 : 0, l_ssl.data_ptr(), l_reg.data_ptr(),
                                          lse.data_ptr(), ws.data_ptr(), stream),
               "adassl_forward");
  return {l_ssl, l_reg, lse};
}

std::vector<torch::Tensor> adassl_backward(torch::Tensor grad_ssl, torch::Tensor grad_reg, torch::Tensor emb_x,
                                           torch::Tensor emb_y, torch::Tensor post_xy, torch::Tensor post_yx,
                                           torch::Tensor prior_xy, torch::Tensor prior_yx, torch::Tensor noise_xy,
                                           torch::Tensor noise_yx, torch::Tensor scale, torch::Tensor lse,
                                           double inv_temperature, c10::optional<double> clamp,
                                           std::string variant, bool normalize, int64_t stream) {
  AdaInputs a = check_ada(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, variant);
  const int64_t M = 2 * a.B;
  auto sc = scalar_arg(scale, "scale", emb_x);
  auto gs = scalar_arg(grad_ssl, "grad_ssl", emb_x);
  auto gr = scalar_arg(grad_reg, "grad_reg", emb_x);
  auto at = acc_type(emb_x.scalar_type());
  auto lse_c = lse_arg(lse, emb_x, M, "(2B,)");
  auto demb_x = torch::empty_like(emb_x);
  auto demb_y = torch::empty_like(emb_y);
  auto dpost_xy = torch::empty_like(post_xy);
  auto dpost_yx = torch::empty_like(post_yx);
  torch::Tensor dprior_xy, dprior_yx;
  if (a.variant == 0) {
    dprior_xy = torch::empty_like(prior_xy);
    dprior_yx = torch::empty_like(prior_yx);
  } else {
    dprior_xy = torch::empty({0}, emb_x.options());
    dprior_yx = torch::empty({0}, emb_x.options());
  }
  auto dscale = torch::empty({}, emb_x.options().dtype(at));
  void* outs[7] = {demb_x.data_ptr(),
                   demb_y.data_ptr(),
                   dpost_xy.data_ptr(),
                   dpost_yx.data_ptr(),
                   a.variant == 0 ? dprior_xy.data_ptr() : nullptr,
                   a.variant == 0 ? dprior_yx.data_ptr() : nullptr,
                   dscale.data_ptr()};
  auto ws = workspace(emb_x, M, M, a.d, true);
  check_launch(adassl_cuda_adassl_backward(dtype_code(emb_x.scalar_type()), a.variant, gs.data_ptr(),
                                           gr.data_ptr(), a.ptrs, a.B, static_cast<int>(a.d),
                                           a.pos.data_ptr<int64_t>(), a.excl.data_ptr<int64_t>(), sc.data_ptr(),
                                           lse_c.data_ptr(), inv_temperature, clamp_value(clamp), normalize ? 1 : 0,
                                           outs, ws.data_ptr(), stream),
               "adassl_backward");
  return {demb_x, demb_y, dpost_xy, dpost_yx, dprior_xy, dprior_yx, dscale.to(scale.scalar_type())};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nt_xent_forward", &nt_xent_forward, "nt_xent core forward -> (loss, lse)");
  m.def("nt_xent_backward", &nt_xent_backward, "nt_xent core backward -> (dcont, dtarg, dscale)");
  m.def("adassl_forward", &adassl_forward, "one-pass AdaSSL forward -> (l_ssl, l_reg, lse)");
  m.def("adassl_backward", &adassl_backward, "one-pass AdaSSL backward -> 7 gradients");
}
