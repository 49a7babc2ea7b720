"""Training metrics out: a tqdm progress bar, a JSONL file, optionally TensorBoard; tokens/s and MFU.

metrics.jsonl is append-only: a resumed run writes {"step": N, "event": "resumed"} and then re-logs the steps after
N that the interrupted run had logged; `read_metrics` gives the history as it stands (those superseded records
dropped).

Throughput is measured between consecutive step completions, less the time spent saving checkpoints and evaluating
in between (the first step, which includes compilation, is not counted). MFU = model FLOP/s / peak FLOP/s of the devices, with the model FLOPs counted analytically
(`train_flops_per_token`): XLA's cost analysis counts a scanned layer's body once, not once per layer. On CPU the
peak is measured with a large float32 matmul, elsewhere it comes from the config (train.peak_tflops_per_device).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import traverse_util


def train_flops_per_token(model, seq_len: int, full_finetune: bool = False) -> float:
    """Model FLOPs of one training token: matmuls 2N forward, 2N for activation gradients, and 2N more for weight
    gradients only under full fine-tuning (LoRA's frozen kernels get none; its own factors are negligible);
    attention scores and values 4*L*T*H*hd forward, twice that backward."""
    flat = traverse_util.flatten_dict(model.abstract_params)
    n = sum(int(x.size) for p, x in flat.items() if p[-1] == "kernel")
    c = model.config
    if getattr(c, "tie_word_embeddings", False):
        n += c.vocab_size * c.hidden_size
    attention = 4 * c.num_hidden_layers * seq_len * c.num_attention_heads * c.head_dim
    return (6 if full_finetune else 4) * n + 3 * attention


def measure_peak_flops(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """Measured matmul FLOP/s of one device (best of `repeats`) for an n x n `dtype` matmul."""
    x = jnp.ones((n, n), jnp.dtype(dtype))
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


class MetricsLogger:
    """Writes one JSON line per logged step to output_dir/metrics.jsonl (process 0 only) and drives the bar."""

    def __init__(self, output_dir: Path, total_steps: int, start_step: int, progress_bar: bool = True,
                 tensorboard: bool = False, peak_flops: float | None = None, log_every: int = 1):
        self.main = jax.process_index() == 0
        self.peak_flops, self.log_every, self.total_steps = peak_flops, log_every, total_steps
        self._file = open(Path(output_dir) / "metrics.jsonl", "a") if self.main else None
        self._bar = None
        if self.main and progress_bar:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self._tb = None
        if self.main and tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        self._last_time: float | None = None
        self._tokens = 0
        self._labelled = 0.0
        self._seconds = 0.0
        self._excluded = 0.0
        if start_step:  # the steps after start_step logged by the interrupted run are re-run: mark where
            self._write({"step": start_step, "event": "resumed"})

    @contextlib.contextmanager
    def not_training(self):
        """Time spent inside (a checkpoint save, an evaluation) is not counted in the next step's throughput: without
        this, the step after each save read the save's time and the others 1.6-3.9x the true average."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self._excluded += time.perf_counter() - t

    def log_step(self, step: int, metrics: dict, tokens: int, flops: float | None) -> None:
        now = time.perf_counter()
        record = {"step": step, **metrics}
        excluded, self._excluded = self._excluded, 0.0
        if self._last_time is not None:  # the first step includes compilation: not a throughput sample
            dt = max(now - self._last_time - excluded, 1e-9)
            self._tokens += tokens
            self._labelled += metrics.get("tokens", 0.0)
            self._seconds += dt
            record["tokens_per_second"] = tokens / dt  # every non-pad token the step ran
            if "tokens" in metrics:  # the tokens the loss was computed on: what an epoch over the data is made of
                record["labelled_tokens_per_second"] = metrics["tokens"] / dt
            if flops and self.peak_flops:
                record["mfu"] = flops / dt / self.peak_flops
        self._last_time = now
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics.get('learning_rate', 0):.2e}",
                                  tok_s=f"{record.get('tokens_per_second', 0):.0f}",
                                  labelled_tok_s=f"{record.get('labelled_tokens_per_second', 0):.0f}",
                                  refresh=False)
        if step % self.log_every == 0 or step == self.total_steps:
            self._write(record)

    def log_eval(self, step: int, eval_loss: float, **extra: float) -> None:
        """Held-out metrics: the loss (and its perplexity) and any others (eval_accuracy)."""
        import math
        self._write({"step": step, "eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0)), **extra})

    def _write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, record["step"])

    def tokens_per_second(self) -> float:
        return self._tokens / self._seconds if self._seconds else 0.0

    def labelled_tokens_per_second(self) -> float:
        return self._labelled / self._seconds if self._seconds else 0.0

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl as the run's history stands: at each resume marker the records of the
    steps after it (logged by the run that was interrupted, then re-run) are dropped, and the marker is kept."""
    path = Path(output_dir) / "metrics.jsonl"
    history: list[dict] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("event") == "resumed":
            history = [r for r in history if r.get("step", 0) <= record["step"]]
        history.append(record)
    return history
