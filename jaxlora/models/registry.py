"""The model families jaxlora supports, in one table, and the lookups from a Hugging Face config.json to a family.

Each family file (jaxlora/models/<family>.py) defines its `FAMILY` record (`jaxlora.models.common.Family`: config
class, Flax module, name table, HF architectures and model_types, objective, extra inputs, KV cache, PEFT's default
targets); `FAMILIES` below lists them. Adding a family is one new file and one entry here
(docs/adding_a_family.md). `Model` reads everything family-specific off the record it gets from `family_for`.
"""

from __future__ import annotations

from jaxlora.models import bert, bloom, gemma, gpt2, llama, mixtral, phi3, qwen3, t5
from jaxlora.models.common import Family

FAMILIES: tuple[Family, ...] = (llama.FAMILY, bloom.FAMILY, gpt2.FAMILY, bert.FAMILY, t5.FAMILY,
                                qwen3.FAMILY, gemma.FAMILY, phi3.FAMILY, mixtral.FAMILY)


def _index(what: str, values) -> dict[str, Family]:
    """{value: family} over `values(family)` of every family; a value claimed by two families is an error."""
    out: dict[str, Family] = {}
    for family in FAMILIES:
        for value in values(family):
            if value in out:
                raise ValueError(f"{what} {value!r} is claimed by families {out[value].name!r} and {family.name!r}")
            out[value] = family
    return out


_BY_ARCHITECTURE = _index("architecture", lambda f: f.architectures)
_BY_MODEL_TYPE = _index("model_type", lambda f: f.model_types)
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_BY_ARCHITECTURE)


def _unsupported(name, where: str) -> ValueError:
    return ValueError(f"{where}: unsupported architecture {name!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def by_architecture(architecture: str, where: str = "config.json") -> Family:
    """The family that loads HF `architecture` (e.g. "Qwen2ForCausalLM"), or ValueError listing the supported ones."""
    if architecture not in _BY_ARCHITECTURE:
        raise _unsupported(architecture, where)
    return _BY_ARCHITECTURE[architecture]


def family_for(hf_config: dict, where: str = "config.json") -> Family:
    """The family of a parsed config.json: by its architectures[0], else (no "architectures") by its model_type;
    an unsupported one is a ValueError naming it and listing the supported architectures."""
    archs = hf_config.get("architectures") or []
    if archs:
        return by_architecture(archs[0], where)
    model_type = hf_config.get("model_type")
    if model_type not in _BY_MODEL_TYPE:
        raise _unsupported(model_type, where)
    return _BY_MODEL_TYPE[model_type]


def architecture_of(hf_config: dict, where: str = "config.json") -> str:
    """The HF architecture a config.json names (for one without "architectures", the one its model_type implies),
    if jaxlora has it (else an error listing the supported ones)."""
    archs = hf_config.get("architectures") or []
    family = family_for(hf_config, where)
    return archs[0] if archs else family.config_cls.from_hf_dict(hf_config, where).architecture
