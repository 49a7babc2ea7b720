"""Model families. Each family module holds its Flax implementation and its config parsed from HF config.json;
`jaxlora.models.registry` maps HF architectures to families."""
