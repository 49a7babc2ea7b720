"""NF4 (QLoRA's 4-bit NormalFloat, arXiv 2305.14314) on a kernel (..., in, out): codes, block absmax, double quant.

Layout, chosen so the codes are bitsandbytes' `quantize_4bit(W, blocksize=64, quant_type="nf4")` codes for the torch
weight W (out, in) = kernel^T, byte for byte:

    blocks    64 consecutive inputs of one output column (= 64 consecutive elements of one row of W), absmax each
    codes     uint8 (..., in_pad/2, out): byte m of column o holds input rows 2m (high nibble) and 2m+1 (low nibble)
    absmax    float32 (..., in_pad/64, out)                     (bnb: absmax[o * in/64 + j] = ours[j, o])

A code is bnb's: x * (1/absmax) clamped to [-1, 1], bucketed by the midpoints of the 16 NF4 values (a value on a
midpoint takes the lower code); the weight is NF4[code] * absmax in float32. An input dim that is not a multiple of
64 is zero-padded per column to the next multiple (in_pad): each column's last block is then partial (its padding is
0, so it changes no absmax) and dequantization drops the padding rows. bnb instead lets blocks run across rows
there, so only kernels with in % 64 == 0 can match it; every HF model we load has such dims.

Double quantization (the paper's, and bnb's `compress_statistics=True`): offset = mean(absmax); absmax - offset,
read in bnb's order (output-major: the flat index o * in_pad/64 + j), is quantized blockwise in blocks of 256 to
bnb's signed 8-bit dynamic code (`create_dynamic_map()`, rebuilt here bit for bit), each value to its nearest code
(bnb's pure-PyTorch kernel; its native CPU kernel's approximate search picks the farther of two near-tied codes
for ~0.15% of values). Stored: qabsmax uint8 (..., in_pad/64, out), absmax2 float32 (..., ceil(n/256)), offset
float32 (...,). That is 8.5 instead of 32 bits per block, 0.13 instead of 0.5 bits per weight. Exactness: inside a
jit XLA contracts a multiply feeding an add into one fused multiply-add (one rounding where bnb rounds twice; there
is no flag against it), so the double-quantized scales (mean - offset, code * absmax2 + offset) can differ from
bnb's by one float32 ulp; the 4-bit codes and the scales without double quantization are exact.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 64  # weights per absmax (QLoRA / bnb default)
BLOCK2 = 256  # absmax values per second-level scale (double quantization)

# The 16 NormalFloat values (QLoRA appendix E; bitsandbytes' NF4 table), float32.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
NF4_MIDPOINTS = (NF4[:-1] + NF4[1:]) / np.float32(2)  # float32 arithmetic, as bnb's bounds


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) on CPU: a float32 step, each value one fused multiply-add
    (start + step*i in the first half, end - step*(steps-1-i) in the second), rounded once to float32."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
    idx = np.arange(steps)
    first = np.float64(start32) + step * idx  # float64 holds the product exactly: one rounding, as an fma
    second = np.float64(end32) - step * (steps - idx - 1)
    return np.where(idx < steps // 2, first, second).astype(np.float32)


def dynamic_map() -> np.ndarray:
    """bitsandbytes' `create_dynamic_map(signed=True)` (the 8-bit code of the double quantization), float32, sorted."""
    data = []
    for i in range(7):  # max_exponent_bits = 7, total_bits = 8, signed
        bounds = _torch_linspace_f32(0.1, 1.0, 2 ** i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        data += (np.float32(10.0 ** (-6 + i)) * means).tolist()
        data += (np.float32(-(10.0 ** (-6 + i))) * means).tolist()
    data += [0.0, 1.0]
    return np.sort(np.asarray(data, np.float32))


DYNAMIC = dynamic_map()
DYNAMIC_MIDPOINTS = (DYNAMIC[:-1] + DYNAMIC[1:]) / np.float32(2)


def padded_rows(d_in: int) -> int:
    return -(-d_in // BLOCK) * BLOCK


def _bucket(scaled: jax.Array, midpoints: np.ndarray) -> jax.Array:
    """How many midpoints are below each value: torch.bucketize(scaled, midpoints) (right=False), as uint8."""
    if len(midpoints) <= 15:  # 15 fused compares
        out = jnp.zeros(scaled.shape, jnp.uint8)
        for m in midpoints:
            out = out + (scaled > m).astype(jnp.uint8)
        return out
    return jnp.searchsorted(jnp.asarray(midpoints), scaled, side="left", method="scan_unrolled").astype(jnp.uint8)


def _reciprocal(absmax: jax.Array) -> jax.Array:
    """1/absmax, and 0 for an all-zero block (bnb clamps to 1e-38 there, a subnormal XLA may flush: same codes)."""
    safe = jnp.where(absmax > 0, absmax, jnp.float32(1))
    return jnp.where(absmax > 0, jnp.float32(1) / safe, jnp.float32(0))


def quantize(w: jax.Array, double_quant: bool = False) -> dict:
    """{"codes", "scale"[, "scale2", "offset"]} of a float kernel (..., in, out) (see the module docstring)."""
    w = w.astype(jnp.float32)
    *lead, d_in, d_out = w.shape
    rows = padded_rows(d_in)
    if rows != d_in:
        w = jnp.pad(w, [(0, 0)] * len(lead) + [(0, rows - d_in), (0, 0)])
    blocks = w.reshape(*lead, rows // BLOCK, BLOCK, d_out)
    absmax = jnp.max(jnp.abs(blocks), axis=-2)  # (..., nb, out)
    scaled = jnp.clip(blocks * _reciprocal(absmax)[..., None, :], -1, 1)
    q = _bucket(scaled, NF4_MIDPOINTS).reshape(*lead, rows // 2, 2, d_out)
    out = {"codes": (q[..., 0, :] << 4) | q[..., 1, :]}
    if not double_quant:
        return out | {"scale": absmax}
    return out | _double_quantize(absmax)


def _output_major(x: jax.Array) -> jax.Array:
    """(..., nb, out) -> (..., out * nb): bnb's order of the absmax vector."""
    return jnp.swapaxes(x, -1, -2).reshape(*x.shape[:-2], -1)


def _blocks2(flat: jax.Array) -> jax.Array:
    n = flat.shape[-1]
    n2 = -(-n // BLOCK2)
    flat = jnp.pad(flat, [(0, 0)] * (flat.ndim - 1) + [(0, n2 * BLOCK2 - n)])
    return flat.reshape(*flat.shape[:-1], n2, BLOCK2)


def _double_quantize(absmax: jax.Array) -> dict:
    """8-bit blockwise (256) quantization of absmax - mean(absmax), in bnb's (output-major) order."""
    nb, d_out = absmax.shape[-2:]
    n = nb * d_out
    offset = jnp.mean(absmax, axis=(-2, -1))
    flat = _output_major(absmax - offset[..., None, None])
    blocks = _blocks2(flat)  # (..., n2, 256), zero-padded
    absmax2 = jnp.max(jnp.abs(blocks), axis=-1)
    scaled = blocks * _reciprocal(absmax2)[..., None]
    if n % BLOCK2:  # bnb's pure-PyTorch kernel divides (not multiplies by the reciprocal) in a partial last block
        last = blocks[..., -1:, :] / jnp.where(absmax2 > 0, absmax2, 1)[..., -1:, None]
        scaled = jnp.concatenate([scaled[..., :-1, :], jnp.where(absmax2[..., -1:, None] > 0, last, 0)], axis=-2)
    q = _bucket(jnp.clip(scaled, -1, 1), DYNAMIC_MIDPOINTS)
    q = q.reshape(*q.shape[:-2], -1)[..., :n].reshape(*absmax.shape[:-2], d_out, nb)
    return {"scale": jnp.swapaxes(q, -1, -2), "scale2": absmax2, "offset": offset}


def dequantize_absmax(qabsmax: jax.Array, absmax2: jax.Array, offset: jax.Array) -> jax.Array:
    """The block absmax (..., nb, out) float32 back from its double quantization: DYNAMIC[q] * absmax2 + offset."""
    nb, d_out = qabsmax.shape[-2:]
    values = jnp.asarray(DYNAMIC)[qabsmax.astype(jnp.int32)]
    flat = (_blocks2(_output_major(values)) * absmax2[..., None]).reshape(*values.shape[:-2], -1)
    absmax = jnp.swapaxes(flat[..., :nb * d_out].reshape(*values.shape[:-2], d_out, nb), -1, -2)
    return absmax + offset[..., None, None]


def dequantize(codes: jax.Array, absmax: jax.Array, d_in: int, dtype) -> jax.Array:
    """The kernel (..., d_in, out) in `dtype`: NF4[code] * absmax (float32, as bnb), then cast."""
    *lead, half, d_out = codes.shape
    idx = jnp.stack([codes >> 4, codes & 0xF], axis=-2).reshape(*lead, 2 * half, d_out)
    values = jnp.asarray(NF4)[idx.astype(jnp.int32)]
    w = (values.reshape(*lead, 2 * half // BLOCK, BLOCK, d_out) * absmax[..., None, :]).reshape(*lead, 2 * half, d_out)
    return w[..., :d_in, :].astype(dtype)


def num_scale2(d_in: int, d_out: int) -> int:
    """Second-level scales of a kernel (in, out) under double quantization."""
    return math.ceil(padded_rows(d_in) // BLOCK * d_out / BLOCK2)
