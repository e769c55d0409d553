"""Worst float64 errors of the torch backend's two schedules against the reference: max |got - ref| / max |ref|
over the loss and every gradient (the scale's included), for nt_xent, info_nce (both forms) and AdaSSL (both
variants, incoming gradients 0.6 and 1.7), with the clamp active and inactive, the row-max path (scale / tau =
2500), odd M and d and several block edges.   Run: .venv/bin/python errors.py
"""

import sys

import torch

import adassl_fast
from adassl_fast.adassl import adassl_nt_xent_reference
from adassl_fast.info_nce import info_nce_reference
from adassl_fast.nt_xent import nt_xent_reference

core, ad, tb = (sys.modules[f"adassl_fast.{m}"] for m in ("core", "adassl", "torch_backend"))
ONE_PASS = core.trains_in_one_pass
CASES = [(130, 11, 0.1, 20.0, 6.0, 7 * 130), (98, 37, 0.3, 20.0, 1.3, 1 << 22), (66, 24, 0.1, None, 250.0, 16 * 66),
         (1030, 93, 0.07, None, 1.0, 1 << 18)]  # M, d, tau, clamp, scale, slab elements


def err(got, ref):
    return max(float((g - r).abs().max() / r.abs().max().clamp_min(1e-300)) for g, r in zip(got, ref, strict=True))


def value_and_grad_err(loss, ref, wrt):
    return max(err([loss.detach()], [ref.detach()]), err(torch.autograd.grad(loss, wrt), torch.autograd.grad(ref, wrt)))


def contrastive(worst, c, t, lam, tau, clamp):
    kw = dict(temperature=tau, scale=lam, clamp=clamp)
    pairs = {
        "nt_xent": (adassl_fast.nt_xent(c, t, impl="torch", **kw), nt_xent_reference(c, t, **kw)),
        "info_nce one-way": (adassl_fast.info_nce(c, t, symmetric=False, impl="torch", **kw),
                             info_nce_reference(c, t, symmetric=False, **kw)),
        "info_nce symmetric (always two passes)": (adassl_fast.info_nce(c, t, impl="torch", **kw),
                                                   info_nce_reference(c, t, **kw)),
    }
    for name, (got, ref) in pairs.items():
        worst[name] = max(worst.get(name, 0.0), value_and_grad_err(got, ref, [c, t, lam]))


def adassl(worst, b, d, lam, tau, clamp):
    for variant in "vs":
        leaf = lambda *s: (3 * torch.randn(*s, dtype=torch.float64)).requires_grad_()
        ins = [leaf(b, d), leaf(b, d), leaf(b, 2 * d), leaf(b, 2 * d)]
        ins += [leaf(b, 2 * d), leaf(b, 2 * d)] if variant == "v" else [None, None]
        draw = torch.randn if variant == "v" else torch.rand
        kw = dict(variant=variant, temperature=tau, scale=lam, clamp=clamp, noise_xy=draw(b, d, dtype=torch.float64),
                  noise_yx=draw(b, d, dtype=torch.float64))
        got, ref = adassl_fast.adassl_nt_xent(*ins, impl="torch", **kw), adassl_nt_xent_reference(*ins, **kw)
        wrt = [x for x in ins if x is not None] + [lam]
        e = max(err(got, ref), value_and_grad_err(0.6 * got[0] + 1.7 * got[1], 0.6 * ref[0] + 1.7 * ref[1], wrt))
        worst[f"adassl {variant}"] = max(worst.get(f"adassl {variant}", 0.0), e)


def main():
    torch.manual_seed(123)
    for path in ("one pass", "two passes"):
        core.trains_in_one_pass = ad.trains_in_one_pass = ONE_PASS if path == "one pass" else (lambda *a: False)
        worst = {}
        for m, d, tau, clamp, scale, slab in CASES:
            tb.SLAB_ELEMENTS = slab
            c, t = (torch.randn(m, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
            lam = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
            contrastive(worst, c, t, lam, tau, clamp)
            adassl(worst, m // 2, d, lam, tau, clamp)
        print(f"{path}: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


if __name__ == "__main__":
    main()
