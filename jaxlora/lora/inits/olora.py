"""OLoRA (Büyükakyüz, arXiv 2406.01775): the adapter starts as the first r columns of the weight's QR factorization.

PEFT (`init_lora_weights="olora"`), in torch's layout W (out, in) = Q R:

    lora_A = R[:r]   (r, in)      lora_B = Q[:, :r]   (out, r)      W <- W - s * lora_B @ lora_A

(no division by the scale: the residual subtracts s times the rank-r part). In jaxlora's layout (kernel K = W^T):
a = R[:r]^T (in, r), b = Q[:, :r]^T (r, out), from the QR of K^T. The base is never rewritten: the update is relative
to the initial factors, s*(a@b - a0@b0), a0 = a and b0 = b frozen, as LoRA-GA and PiSSA (`jaxlora.lora.weights`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnums=1)
def olora_factors(kernel, rank: int):
    """(a (..., in, r), b (..., r, out)) float32 from the QR factorization of kernel^T (..., out, in)."""
    w_OxI = jnp.swapaxes(kernel.astype(jnp.float32), -1, -2)  # torch's weight layout; QArray.astype dequantizes
    q_OxK, r_KxI = jnp.linalg.qr(w_OxI)  # Householder (LAPACK geqrf), as torch.linalg.qr
    return jnp.swapaxes(r_KxI[..., :rank, :], -1, -2), jnp.swapaxes(q_OxK[..., :, :rank], -1, -2)
