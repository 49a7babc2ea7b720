"""jaxlora: LoRA and LoRA-GA fine-tuning of Hugging Face language models in JAX/Flax.

The public surface is re-exported here and imported lazily (PEP 562): `import jaxlora` loads no JAX, orbax,
datasets or torch until a name is first used, so the CLI's `--help` and a config check start at once.

    models/   the model families (one file each), their registry, `Model` and `from_pretrained`
    lora/     LoRA's config, targeting, the adapter leaf, init/merge, LoRA-GA
    training/ data, optimizer, the one training build, the jitted step, the loop
    io/       Hugging Face safetensors, PEFT adapters, orbax checkpoints, YAML configs
    plan/     `jaxlora plan`: AOT compilation of the training build for a TPU topology
    tasks/    task code on top (T5 label words on GLUE, encoder classifiers)
"""

import importlib

_EXPORTS = {
    "LoraConfig": "jaxlora.lora.config", "LoraGAConfig": "jaxlora.lora.config", "LoraWeights": "jaxlora.lora.weights",
    "init_lora": "jaxlora.lora.tree", "merge": "jaxlora.lora.tree", "unmerge": "jaxlora.lora.tree",
    "lora_ga_init": "jaxlora.lora.ga", "Model": "jaxlora.models.model", "from_pretrained": "jaxlora.models.model",
    "export_peft": "jaxlora.io.peft", "import_peft": "jaxlora.io.peft", "generate": "jaxlora.generation",
    "train": "jaxlora.training.trainer", "build_training": "jaxlora.training.build",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jaxlora' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
