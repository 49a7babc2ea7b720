"""int8 weights: symmetric, one scale per output channel (LLM.int8()'s weight quantization).

For a kernel (..., in, out), column o (row o of the torch weight W (out, in)) has absmax_o = max |W[o, :]| and
codes round(w * (127 / absmax_o)) in [-127, 127]; the weight is codes * absmax_o * (1/127) (scale = absmax/127). The
float32 operations and their order are bitsandbytes' `int8_vectorwise_quant` / `int8_vectorwise_dequant` (round half
to even), so codes and dequantized weights equal bnb's bit for bit. An all-zero column gets absmax 0 and codes 0
(bnb would divide by zero there). Stored: codes int8 (..., in, out), absmax float32 (..., 1, out).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

INV_127 = np.float32(7.874015718698502e-3)  # bnb's constant for 1/127


def quantize(w: jax.Array) -> dict:
    """{"codes": int8 (..., in, out), "scale": absmax float32 (..., 1, out)}."""
    w = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w), axis=-2, keepdims=True)
    factor = jnp.where(absmax > 0, jnp.float32(127) / jnp.where(absmax > 0, absmax, 1), 0)
    codes = jnp.clip(jnp.round(w * factor), -127, 127).astype(jnp.int8)
    return {"codes": codes, "scale": absmax}


def dequantize(codes: jax.Array, absmax: jax.Array, dtype) -> jax.Array:
    """codes * absmax * (1/127) in float32 (bnb's order), cast to `dtype`."""
    return (codes.astype(jnp.float32) * absmax * INV_127).astype(dtype)
