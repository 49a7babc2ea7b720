"""The model a plan compiles: its HF config (built-in shapes, a local folder or a hub id) and the abstract model.

Planning needs only the shapes, never the weights: `SHAPES` holds the HF configs of the models of the README table
(and `_HUB_SHAPES` maps their hub ids to them, so configs/ plan offline), and `build_model` builds the model
`jaxlora train` would load with abstract params and their shardings.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxlora.config import RunConfig
from jaxlora.plan.targets import PlanError


# Model shapes for planning without a download: HF config dicts (weights never needed).
_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
              tie_word_embeddings=False, max_position_embeddings=4096, rope_theta=10000.0)
SHAPES = {
    "llama-2-7b": dict(_LLAMA, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32),
    "llama-2-13b": dict(_LLAMA, vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40),
    # meta-llama/Meta-Llama-3-8B: the 128,256-token vocabulary makes its logits the largest activation
    "llama-3-8b": dict(_LLAMA, vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                       max_position_embeddings=8192),
    "llama-3-70b": dict(_LLAMA, vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, rope_theta=500000.0,
                        max_position_embeddings=8192),
    "bloom-7b1": dict(architectures=["BloomForCausalLM"], model_type="bloom", vocab_size=250880, hidden_size=4096,
                      n_layer=30, n_head=32, layer_norm_epsilon=1e-5, apply_residual_connection_post_layernorm=False,
                      tie_word_embeddings=True),
    # google/gemma-2-9b config.json (the fields jaxlora reads; transformers' defaults otherwise)
    "gemma-2-9b": dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", vocab_size=256000,
                       hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=256, hidden_act="gelu_pytorch_tanh",
                       hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, sliding_window=4096, max_position_embeddings=8192,
                       rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False, tie_word_embeddings=True),
    # mistralai/Mixtral-8x7B-v0.1 config.json
    "mixtral-8x7b": dict(architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=32000,
                         hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, hidden_act="silu",
                         max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
                         router_aux_loss_coef=0.02, output_router_logits=False, tie_word_embeddings=False),
}


# Hub ids of the same shapes, so the configs in configs/ plan offline.
_HUB_SHAPES = {"meta-llama/Llama-2-7b-hf": "llama-2-7b", "meta-llama/Llama-2-7b-chat-hf": "llama-2-7b",
               "meta-llama/Llama-2-13b-hf": "llama-2-13b", "meta-llama/Llama-2-13b-chat-hf": "llama-2-13b",
               "meta-llama/Meta-Llama-3-8B": "llama-3-8b", "meta-llama/Meta-Llama-3-70B": "llama-3-70b", "meta-llama/Meta-Llama-3-70B-Instruct": "llama-3-70b",
               "bigscience/bloom-7b1": "bloom-7b1", "bigscience/bloomz-7b1-mt": "bloom-7b1",
               "google/gemma-2-9b": "gemma-2-9b", "google/gemma-2-9b-it": "gemma-2-9b",
               "mistralai/Mixtral-8x7B-v0.1": "mixtral-8x7b", "mistralai/Mixtral-8x7B-Instruct-v0.1": "mixtral-8x7b"}


def hf_config_of(path: str) -> dict:
    """The HF config dict of `model.path`: a built-in shape (SHAPES), a local folder's config.json, or a hub id's
    config.json (only that file is downloaded)."""
    if path.lower() in SHAPES:
        return dict(SHAPES[path.lower()])
    folder = Path(path)
    if (folder / "config.json").exists():
        return json.loads((folder / "config.json").read_text())
    if folder.exists() or path.count("/") != 1:
        raise PlanError(f"model.path {path!r}: no config.json there; give a model folder, a hub id, or one of "
                        f"the built-in shapes {', '.join(SHAPES)}")
    try:
        from huggingface_hub import hf_hub_download
        return json.loads(Path(hf_hub_download(path, "config.json")).read_text())
    except Exception as e:
        if path in _HUB_SHAPES:  # offline: the shape is known
            return dict(SHAPES[_HUB_SHAPES[path]])
        raise PlanError(f"model.path {path!r}: could not read its config.json from the hub ({e}); use a local "
                        f"folder or one of {', '.join(SHAPES)}") from None


def build_model(config: RunConfig, mesh, remat: str | None = None, hf_config: dict | None = None):
    """The model `jaxlora train` would load, without its weights (abstract params and their shardings)."""
    from jaxlora.models.model import Model
    m = config.model
    return Model._build(hf_config or hf_config_of(m.path), m.dtype, m.param_dtype, mesh, where=m.path,
                        remat=remat or m.remat, attention_impl=m.attention_impl, quantization=m.quantization,
                        double_quant=m.double_quant, loss_chunk=m.loss_chunk)
