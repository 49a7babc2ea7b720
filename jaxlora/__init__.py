"""jaxlora: LoRA and LoRA-GA fine-tuning of Hugging Face language models in JAX/Flax."""

from jaxlora.lora import LoraConfig, init_lora, merge, unmerge
from jaxlora.lora_weights import LoraWeights
from jaxlora.model import Model, from_pretrained

__all__ = ["LoraConfig", "LoraWeights", "Model", "from_pretrained", "init_lora", "merge", "unmerge"]
