// Scalar math shared by every CUDA kernel of adassl_fast.
//
// Everything here is __host__ __device__ and templated on the compute type (float or double) so that
// tests/test_cuda_build.py can compile it for the host and compare it with a float64 torch reference.
// No CUDA runtime header is needed: with a plain host compiler the qualifiers expand to nothing.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define ADASSL_HD __host__ __device__ __forceinline__
#else
#define ADASSL_HD inline
#endif

namespace adassl {

template <class T>
ADASSL_HD T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// ---------------------------------------------------------------------------------------------
// Online log-sum-exp. `s` is sum exp(x - m) over the values pushed so far; an empty state has
// m = -inf, s = 0. Merging is associative, so per-thread partial states over column tiles can be
// combined in any fixed order (the kernels use a fixed shuffle tree: deterministic).
// ---------------------------------------------------------------------------------------------
template <class T>
struct LseState {
  T m;
  T s;
};

template <class T>
ADASSL_HD LseState<T> lse_empty() {
  return LseState<T>{neg_inf<T>(), T(0)};
}

template <class T>
ADASSL_HD LseState<T> lse_push(LseState<T> a, T x) {
  if (x == neg_inf<T>()) return a;
  if (x > a.m) {
    // a.m may be -inf: exp(-inf) = 0 and s is 0 then, so the product is 0 (never inf * 0).
    T s = (a.m == neg_inf<T>()) ? T(0) : a.s * exp(a.m - x);
    return LseState<T>{x, s + T(1)};
  }
  return LseState<T>{a.m, a.s + exp(x - a.m)};
}

template <class T>
ADASSL_HD LseState<T> lse_merge(LseState<T> a, LseState<T> b) {
  if (a.m == neg_inf<T>()) return b;
  if (b.m == neg_inf<T>()) return a;
  if (a.m >= b.m) return LseState<T>{a.m, a.s + b.s * exp(b.m - a.m)};
  return LseState<T>{b.m, b.s + a.s * exp(a.m - b.m)};
}

template <class T>
ADASSL_HD T lse_value(LseState<T> a) {
  if (a.m == neg_inf<T>()) return neg_inf<T>();
  return a.m + log(a.s);
}

// ---------------------------------------------------------------------------------------------
// Logit clamp. Forward: S^ = min(max(S, -c), c). Backward indicator is inclusive (torch 2.3 semantics,
// docs/spec.md 2.1): an entry exactly at +-c passes its gradient. c = +inf means "no clamp".
// ---------------------------------------------------------------------------------------------
template <class T>
ADASSL_HD T clamp_logit(T s, T c) {
  return fmin(fmax(s, -c), c);
}

template <class T>
ADASSL_HD T clamp_pass(T s, T c) {
  return (s >= -c && s <= c) ? T(1) : T(0);
}

// ---------------------------------------------------------------------------------------------
// softplus with torch's beta=1, threshold=20 (identity above 20), its derivative, log-sigmoid.
// ---------------------------------------------------------------------------------------------
template <class T>
ADASSL_HD T softplus(T x) {
  return x > T(20) ? x : log1p(exp(x));
}

template <class T>
ADASSL_HD T sigmoid(T x) {
  return T(1) / (T(1) + exp(-x));
}

// d softplus / dx with the same threshold: exactly 1 above 20.
template <class T>
ADASSL_HD T softplus_grad(T x) {
  return x > T(20) ? T(1) : sigmoid(x);
}

template <class T>
ADASSL_HD T log_sigmoid(T x) {
  // log sigmoid(x) = min(x, 0) - log1p(exp(-|x|)): no overflow on either side.
  return fmin(x, T(0)) - log1p(exp(-fabs(x)));
}

// ---------------------------------------------------------------------------------------------
// AdaSSL-V (docs/spec.md 2.4, 3.3). sigma = softplus(a) + 1e-6; logvar = clamp(2 log sigma, -10, 10).
// ---------------------------------------------------------------------------------------------
template <class T>
ADASSL_HD T gauss_logvar_raw(T a) {
  return T(2) * log(softplus(a) + T(1e-6));
}

template <class T>
ADASSL_HD T gauss_logvar(T a) {
  return fmin(fmax(gauss_logvar_raw(a), T(-10)), T(10));
}

// Inclusive indicator of the logvar clamp (gradient passes at exactly +-10).
template <class T>
ADASSL_HD T gauss_logvar_pass(T a) {
  T l = gauss_logvar_raw(a);
  return (l >= T(-10) && l <= T(10)) ? T(1) : T(0);
}

// d logvar_raw / da = 2 softplus'(a) / (softplus(a) + 1e-6).
template <class T>
ADASSL_HD T gauss_logvar_grad(T a) {
  return T(2) * softplus_grad(a) / (softplus(a) + T(1e-6));
}

// Reparameterised sample r = mu + eps * exp(logvar / 2).
template <class T>
ADASSL_HD T gauss_sample(T mu, T a, T eps) {
  return mu + eps * exp(T(0.5) * gauss_logvar(a));
}

// One element of KL(N(mu_q, e^lq) || N(mu_p, e^lp)) with the clamped log-variances.
template <class T>
ADASSL_HD T gauss_kl(T mu_q, T a_q, T mu_p, T a_p) {
  T lq = gauss_logvar(a_q), lp = gauss_logvar(a_p);
  T dlt = mu_q - mu_p;
  return T(0.5) * (lp - lq + exp(lq - lp) + dlt * dlt * exp(-lp) - T(1));
}

// Gradients of c * KL (one element) with respect to mu_q, a_q, mu_p, a_p (docs/spec.md 3.3).
template <class T>
struct KlGrad {
  T mu_q, a_q, mu_p, a_p;
};

template <class T>
ADASSL_HD KlGrad<T> gauss_kl_grad(T mu_q, T a_q, T mu_p, T a_p, T c) {
  T lq = gauss_logvar(a_q), lp = gauss_logvar(a_p);
  T dlt = mu_q - mu_p;
  T w = exp(-lp);
  T rho = exp(lq - lp);
  KlGrad<T> g;
  g.mu_q = c * dlt * w;
  g.mu_p = -g.mu_q;
  g.a_q = c * T(0.5) * (rho - T(1)) * gauss_logvar_pass(a_q) * gauss_logvar_grad(a_q);
  g.a_p = c * T(0.5) * (T(1) - rho - dlt * dlt * w) * gauss_logvar_pass(a_p) * gauss_logvar_grad(a_p);
  return g;
}

// d r / d a for r = mu + eps * exp(logvar(a) / 2).
template <class T>
ADASSL_HD T gauss_sample_grad_a(T a, T eps) {
  return T(0.5) * eps * exp(T(0.5) * gauss_logvar(a)) * gauss_logvar_pass(a) * gauss_logvar_grad(a);
}

// ---------------------------------------------------------------------------------------------
// AdaSSL-S (docs/spec.md 2.6, 3.4). u clamped to [1e-6, 1 - 1e-6]; logistic noise g = log u - log(1 - u);
// hard mask 1[logits + g > 0] (strict); straight-through gradient of y = sigmoid(logits + g).
// ---------------------------------------------------------------------------------------------
template <class T>
ADASSL_HD T logistic_noise(T u) {
  T uc = fmin(fmax(u, T(1e-6)), T(1) - T(1e-6));
  return log(uc) - log1p(-uc);
}

template <class T>
ADASSL_HD T st_mask(T logits, T u) {
  return (logits + logistic_noise(u)) > T(0) ? T(1) : T(0);
}

// dy/dlogits = y (1 - y), y = sigmoid(logits + g).
template <class T>
ADASSL_HD T st_mask_grad(T logits, T u) {
  T y = sigmoid(logits + logistic_noise(u));
  return y * (T(1) - y);
}

// L0 term of one element: sigmoid(logits); its derivative s (1 - s).
template <class T>
ADASSL_HD T l0_term(T logits) {
  return sigmoid(logits);
}

template <class T>
ADASSL_HD T l0_grad(T logits) {
  T s = sigmoid(logits);
  return s * (T(1) - s);
}

}  // namespace adassl
