"""Quantized frozen bases for QLoRA: int8 (per output channel) and NF4 (blocks of 64, optional double quantization).

    model = jaxlora.from_pretrained(path, "bfloat16", quantization="nf4")          # or "int8"; double_quant=True
    dense = jaxlora.quant.dequantize_params(model.params)                          # e.g. for a merged export

The transformer blocks' linear kernels are quantized while the checkpoint loads, tensor by tensor into their
shardings; `LoraDense` dequantizes them inside the jitted matmul. LoRA and LoRA-GA train on top unchanged: the
base is frozen, and LoRA-GA's gradient is taken w.r.t. the dequantized kernel.

    nf4.py      the NF4 code, packing and double quantization (bitsandbytes' layout and codes)
    int8.py     int8 per output channel (bitsandbytes' int8_vectorwise_quant)
    qarray.py   QArray, the quantized kernel as a pytree that reads like its dense kernel
    apply.py    which kernels, their layout and shardings, quantizing while loading

Why not google's qwix (0.1.8, checked): its NF4 (argmin over the 16 values, one jnp.uint4 per weight, the scale in
the weight's dtype) has no double quantization and is not bitsandbytes' layout or rounding; its int8 scale is
absmax/127.5; its LoRA is a provider that intercepts the model's dot_generals and keeps LoRA params inside the
module, which would replace our LoRA tree (the step's differentiated argument, PEFT export, LoRA-GA's frozen a0/b0
and gradient estimation); and its PTQ quantizes an already materialized float param tree, where we quantize each
tensor as it loads into its shardings. What we need is ~250 lines here, exact against bitsandbytes.
"""

import jax

from jaxlora.quant.apply import QuantConfig, quantize_params, quantized_layout, quantized_paths
from jaxlora.quant.qarray import KINDS, QArray, dequantize, dequantize_tree, has_quantized, is_quantized, quantize


def dequantize_params(params, dtype=None):
    """The param tree with every quantized kernel dequantized (to the dtype it stands for, or `dtype`), jitted;
    unquantized params pass through. A merged export of a quantized base merges into this (dense) tree."""
    if not has_quantized(params):
        return params
    return jax.jit(lambda p: dequantize_tree(p, dtype))(params)


__all__ = ["KINDS", "QArray", "QuantConfig", "dequantize", "dequantize_params", "dequantize_tree", "has_quantized",
           "is_quantized", "quantize", "quantize_params", "quantized_layout", "quantized_paths"]
