"""PiSSA (Meng et al., arXiv 2404.02948): the adapter starts as the top-r singular triplets of the weight itself.

PEFT (`init_lora_weights="pissa"` / `"pissa_niter_K"`), in torch's layout W (out, in) = V S U^T:

    lora_A = sqrt(S_r / s) U_r^T   (r, in)      lora_B = V_r sqrt(S_r / s)   (out, r)      W <- W - s * lora_B @ lora_A

so s * lora_B @ lora_A is the best rank-r approximation of W, and PEFT rewrites the base to the residual. In jaxlora's
layout (kernel K = W^T (in, out) = U S V^T): a = U_r sqrt(S_r / s) (in, r), b = sqrt(S_r / s) V_r^T (r, out). The base
is never rewritten: like LoRA-GA's, the update is taken relative to the initial factors, s*(a@b - a0@b0), with a0 = a,
b0 = b frozen (`jaxlora.lora.weights`), which is W0 - s*a0@b0 + s*a@b, PEFT's model, on the untouched W0.

"pissa" is an exact SVD; "pissa_niter_K" a randomized one with q = r sketch columns and K power iterations, as
torch.svd_lowrank(W, r, niter=K). Both are LoRA-GA's factorization code (`jaxlora.lora.ga.factorize`), vmapped over
stacked layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlora.lora.ga.factorize import factorize_gradient


def pissa_factors(kernel, rank: int, scale: float, niter: int | None, key):
    """(a (..., in, r), b (..., r, out)) float32 from the top-r singular triplets of kernel (..., in, out);
    `niter` None: exact SVD, else a randomized SVD with r columns and `niter` power iterations."""
    k32 = kernel.astype(jnp.float32)  # a quantized kernel (QArray) is dequantized by astype
    if niter is None:
        u, s, vt = factorize_gradient(k32, "exact", 0, 0, key)
    else:
        u, s, vt = factorize_gradient(k32, "randomized", rank, niter, key)
    return _split(u[..., :, :rank], s[..., :rank], vt[..., :rank, :], scale)


@jax.jit
def _split(u, s, vt, scale):
    root = jnp.sqrt(s / scale)  # sqrt(S_r / s) on both factors, as PEFT: s * a @ b = U_r S_r V_r^T
    return u * root[..., None, :], root[..., :, None] * vt
