"""The run config: one typed, frozen dataclass per concern, composed into `RunConfig`.

A YAML file in configs/ fills in this schema (`jaxlora train --config configs/x.yaml --set optim.learning_rate=1e-4`);
an unknown key or a wrong type is an error naming the key (see `configfile`). Each section's dataclass lives with the
code it configures: LoraConfig in lora/config.py, DataConfig in training/data/config.py, OptimConfig in
training/optim.py, MeshConfig in sharding.py.
"""

from __future__ import annotations

import dataclasses

from jaxlora.training.data import DataConfig
from jaxlora.lora import LoraConfig
from jaxlora.training.optim import OptimConfig
from jaxlora.sharding import MeshConfig
from jaxlora.models.common import REMAT_POLICIES
from jaxlora.quant.qarray import KINDS as QUANT_KINDS


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    path: str = ""  # Hugging Face model folder or hub id
    dtype: str = "float32"  # compute dtype: float32, or bfloat16 on accelerators; float16 trains with dynamic loss
    #                         scaling (optim.loss_scale_*)
    param_dtype: str | None = None  # storage dtype of the frozen base (default: dtype)
    remat: str = "none"  # rematerialization: none, full, save_matmuls
    attention_impl: str | None = None  # None (XLA picks), xla, or cudnn (flash attention on NVIDIA GPUs)
    quantization: str | None = None  # the frozen base's block kernels: null, int8 (per output channel) or nf4
    #                                  (QLoRA's 4-bit NormalFloat, blocks of 64), quantized as they load
    double_quant: bool = False  # nf4: also quantize the block scales (8-bit, blocks of 256), QLoRA's double quant
    loss_chunk: int = 0  # causal LMs: > 0 applies the head to this many tokens at a time (the fused chunked loss), so
    #                      the (batch, seq, vocab) logits never exist at once; 0 computes all logits together
    logits_at_targets: bool = False  # causal LMs: the head (and the loss) only at the positions that predict a
    #                                  labelled token (prompt and padding positions skip the vocabulary matmul); the
    #                                  same loss and gradients

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.attention_impl not in (None, "xla", "cudnn"):
            raise ValueError(f"attention_impl must be null, xla or cudnn, got {self.attention_impl!r}")
        if self.quantization not in (None, *QUANT_KINDS):
            raise ValueError(f"quantization must be null, int8 or nf4, got {self.quantization!r}")
        if self.loss_chunk < 0:
            raise ValueError(f"loss_chunk must be >= 0 (0: no chunking), got {self.loss_chunk}")
        if self.double_quant and self.quantization != "nf4":
            raise ValueError(f"double_quant applies to quantization: nf4 only (quantization is "
                             f"{self.quantization!r})")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/default"  # checkpoints, metrics.jsonl, the final adapter and the resolved config
    micro_batch_size: int = 8  # examples per micro-batch, across all devices and processes
    grad_accum_steps: int = 1  # micro-batches per optimizer step (effective batch = micro * accum)
    epochs: float = 1.0  # passes over the training data (ignored when max_steps is set)
    max_steps: int | None = None  # optimizer steps; overrides epochs
    seed: int = 0  # data order, LoRA init and dropout
    log_every: int = 10  # steps between metric lines (metrics.jsonl, TensorBoard)
    eval_every: int = 0  # steps between held-out evaluations; 0 = only at the end (if eval data exists)
    eval_batches: int | None = None  # cap on held-out batches per evaluation (None = all)
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 3  # checkpoints kept (oldest deleted)
    resume: bool = True  # continue from the latest checkpoint in output_dir if there is one
    tensorboard: bool = False  # also write TensorBoard events (needs tensorboardX)
    peak_tflops_per_device: float | None = None  # for MFU; None = measured matmul peak on CPU, unknown elsewhere
    progress_bar: bool = True  # tqdm progress bar
    coordinator_address: str | None = None  # multi-process: host:port of process 0 (automatic on TPU pods)
    num_processes: int | None = None  # multi-process: total processes
    process_id: int | None = None  # multi-process: this process's index

    def __post_init__(self):
        for name in ("micro_batch_size", "grad_accum_steps", "log_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0 (0 = only at the end), got {self.save_every}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)


def load_run_config(path: str | None, overrides=()) -> RunConfig:
    from jaxlora.io.configfile import load_config
    return load_config(RunConfig, path, overrides)
