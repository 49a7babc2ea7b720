"""jaxlora: LoRA and LoRA-GA fine-tuning of Hugging Face language models in JAX/Flax."""

from jaxlora.generation import generate
from jaxlora.lora import LoraConfig, LoraGAConfig, init_lora, merge, unmerge
from jaxlora.lora_ga import lora_ga_init
from jaxlora.lora_weights import LoraWeights
from jaxlora.model import Model, from_pretrained
from jaxlora.peft_format import export_peft, import_peft
from jaxlora.trainer import train

__all__ = ["LoraConfig", "LoraGAConfig", "LoraWeights", "Model", "export_peft", "from_pretrained", "generate",
           "import_peft", "init_lora", "lora_ga_init", "merge", "train", "unmerge"]
