"""Reading and writing: Hugging Face safetensors, PEFT adapters, orbax training checkpoints, YAML run configs."""
