"""LoRA training throughput: jaxlora vs PEFT + transformers (PyTorch) on the same model, LoRA config, data and loss.

    python scripts/bench_throughput.py                  # SmolLM2-135M (real weights), CPU, 8 x 256 tokens, r=8
    python scripts/bench_throughput.py --quick          # tiny random Llama (smoke test, < 1 min)
    python scripts/bench_throughput.py --real-data      # one pass over real data: packed / bucketed vs PEFT's collators
    python scripts/bench_throughput.py --device gpu     # the same on a GPU (jax with CUDA, torch with CUDA)
    python scripts/bench_throughput.py --device gpu --model llama1b --dtype bfloat16    # ~1.2B random Llama, seq 2048
    python scripts/bench_throughput.py --model llama1b --set num_hidden_layers=1 hidden_size=128 \\
        intermediate_size=256 num_attention_heads=4 num_key_value_heads=2 --seq 64 --batch 2   # the 1B path on CPU

What is compared (one run, both frameworks, each in its own long-lived subprocess so its memory is its own):
  jaxlora  `jaxlora.training.step`'s jitted train step (the trainer's: donated state, AdamW via `jaxlora.training.optim`, global-norm
           clipping 1.0, constant learning rate), built by `jaxlora.training.build.build_training`, compiled once.
  PEFT     transformers AutoModelForCausalLM + `peft.get_peft_model`, torch.optim.AdamW over the LoRA parameters
           (weight decay 0, as jaxlora's default), clip_grad_norm_(1.0); `torch.set_num_threads(all cores)`.
Both: LoRA r=8, alpha 16, dropout 0 on q/k/v/o/gate/up/down (PEFT's all-linear), float32 (or --dtype), no
rematerialization; loss = mean next-token cross entropy over labelled tokens (HF's causal-LM loss, jaxlora's
`token_loss_sums`). Data: gsm_symbolic training records tokenized once by `jaxlora.training.data` (prompt "Question: {input}
\\nAnswer: " masked, EOS appended, truncated), every batch padded to --seq; both see batch i at step i, so their
first losses must agree (B = 0 at init: both are the base model's loss on the same tokens), except with --model
llama1b, whose random weights each framework draws itself.

Protocol: each worker loads, builds and runs --warmup steps (jaxlora compiles there); then the driver alternates timed
blocks of --steps / --blocks steps, ABBA order (jaxlora, PEFT, PEFT, jaxlora, ...), while the other worker sleeps on
its stdin. tokens/s = batch x seq (padded: both compute every position) / step time, median over blocks; the non-pad
rate is reported too. MFU = tokens/s x `jaxlora.training.metrics.train_flops_per_token` / the measured matmul peak (CPU:
`measure_peak_flops`, float32 2048^3, measured in the jaxlora worker between blocks, so under the same load).
Memory (CPU): RSS of each worker; "peak" = VmHWM (loading, compilation and training), "steady" = VmHWM reset
after warm-up (the timed steps only), "loaded" = RSS after the model and batches are in. GPU: device memory
(jax `memory_stats()['peak_bytes_in_use']`, `torch.cuda.max_memory_allocated`). The 2-core CPU is often shared:
the load average at start and end is recorded with every run; numbers taken under load are not comparable.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

from bench_common import (WorkerProcess, machine_info, maxrss_kb, reply, reset_peak, status_kb,  # noqa: E402
                          versions)

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128, hidden_size=64,
                  intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
# ~1.2B Llama (TinyLlama-1.1B's shape, SmolLM2's 49,152-token vocabulary so the same tokenized data fits), random
# weights: 22 layers x (4 x 2048^2 attention, GQA 32/4 heads) + 3 x 2048 x 5632 MLP, untied 49,152 x 2048 head.
LLAMA_1B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=2048,
                intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2, pad_token_id=2)


# ------------------------------------------------------------------------------------------ data


def prepare(args, workdir: pathlib.Path) -> dict:
    """The batches every worker trains on (an .npz), and, with --quick, the tiny model folder both load."""
    import numpy as np
    n = args.warmup + args.steps
    if args.quick:
        import torch
        import transformers
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "architectures"})
        transformers.LlamaForCausalLM(cfg).save_pretrained(workdir / "model")
        rng = np.random.default_rng(0)
        batches = []
        for _ in range(n):  # prompt (masked) + response + right padding, like the real data
            ids = rng.integers(3, TINY_LLAMA["vocab_size"], (args.batch, args.seq), dtype=np.int32)
            lens = rng.integers(args.seq // 2, args.seq + 1, args.batch)
            mask = (np.arange(args.seq)[None] < lens[:, None]).astype(np.int32)
            labels = np.where(mask == 1, ids, -100)
            labels[:, : args.seq // 4] = -100
            batches.append({"input_ids": np.where(mask == 1, ids, 0), "attention_mask": mask, "labels": labels})
        model_path, source = str(workdir / "model"), "random tokens (first quarter masked, random right padding)"
    else:
        from transformers import AutoTokenizer
        import assets
        from jaxlora.training import data as data_lib
        model_path = args.model if args.model not in ("smollm2", "llama1b") else (
            str(assets.smollm2_path()) if args.model == "smollm2" else None)
        tok = AutoTokenizer.from_pretrained(model_path or str(assets.smollm2_path()))
        path = args.data or str(assets.gsm_data_paths()["train"])
        cfg = data_lib.DataConfig(path=path, prompt_template="Question: {input}\nAnswer: ",
                                  response_template="{target}", max_length=args.seq, bucket_lengths=(args.seq,),
                                  max_examples=n * args.batch)
        data = data_lib.load_tokenized(cfg, tok, "train")
        if len(data) < n * args.batch:  # a short --seq drops examples whose prompt fills it: read further
            data = data_lib.load_tokenized(dataclasses.replace(cfg, max_examples=None), tok, "train")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        loader = data_lib.BatchLoader(data, args.batch, (args.seq,), pad, shuffle=False)
        batches = [loader.batch(i) for i in range(n)]
        source = (f"{pathlib.Path(path).name}: the first {n * args.batch} examples with a labelled token within "
                  f"{args.seq} (wrapping), tokenized by jaxlora.training.data, padded to {args.seq}")
    arrays = {f"{k}_{i}": v for i, b in enumerate(batches) for k, v in b.items()}
    np.savez(workdir / "batches.npz", num_batches=np.array(len(batches)), **arrays)
    real = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches) / len(batches)
    return {"model_path": model_path, "data": source, "real_tokens_per_batch": real,
            "labelled_tokens_per_batch": labelled}


def _load_batches(path) -> list[dict]:
    import numpy as np
    z = np.load(path)
    return [{k: z[f"{k}_{i}"] for k in ("input_ids", "attention_mask", "labels")} for i in range(int(z["num_batches"]))]


def hf_config(args) -> dict:
    """The HF config dict of a random model (--model llama1b, with --set overrides)."""
    cfg = dict(LLAMA_1B)
    for item in args.set or []:
        key, val = item.split("=", 1)
        if key not in cfg:
            raise SystemExit(f"--set {key}: not a key of the llama1b config ({', '.join(cfg)})")
        old = cfg[key]
        if isinstance(old, bool):
            cfg[key] = val.lower() in ("1", "true", "yes")
        elif isinstance(old, (int, float)):
            cfg[key] = type(old)(float(val))
        else:
            cfg[key] = val
    return cfg


# ------------------------------------------------------------------------------------------ workers


class JaxWorker:
    """jaxlora: the library's own jitted step, compiled once for the (batch, seq) shape."""

    def __init__(self, args):
        import jax
        from jaxlora import sharding
        from jaxlora.config import RunConfig
        from jaxlora.lora import LoraConfig
        from jaxlora.models.model import Model, from_pretrained
        from jaxlora.training import optim
        from jaxlora.training import step as step_lib
        from jaxlora.training.build import build_training
        from jaxlora.training.metrics import train_flops_per_token

        self.jax = jax
        from jaxlora.backends import skip_tpu_backend_without_tpu
        skip_tpu_backend_without_tpu()  # no libtpu noise on a CPU/GPU host
        mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
        if args.model_path:
            self.model = from_pretrained(args.model_path, args.dtype, mesh=mesh, attention_impl=args.attention_impl,
                                         loss_chunk=args.loss_chunk)
        else:
            self.model = Model.random(hf_config(args), dtype=args.dtype, param_dtype=args.dtype, mesh=mesh,
                                      attention_impl=args.attention_impl, loss_chunk=args.loss_chunk)
        batches = _load_batches(args.batches_file)
        self.batches = [step_lib.place_batch(b, mesh) for b in batches]
        jax.block_until_ready((self.model.params, self.batches))
        self.loaded_mb = (status_kb("VmRSS") or 0) / 1024
        cfg = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=ALL_LINEAR,
                         use_dora=args.use_dora)
        run = RunConfig(lora=cfg, optim=optim.OptimConfig(learning_rate=args.lr, schedule="constant"))
        training = build_training(self.model, run, total_steps=10**6,
                                  rngs=(jax.random.key(args.seed), jax.random.key(args.seed + 1)))
        self.params, self.state, step = training.params, training.state, training.train_step
        t0 = time.perf_counter()
        self.step = step.lower(self.params, self.state, self.batches[0]).compile()
        self.compile_s = time.perf_counter() - t0
        self.flops_per_token = train_flops_per_token(self.model, args.seq)
        self.lora_params = sum(int(x.size) for x in jax.tree.leaves(self.state.trainable["lora"]))

    def run(self, start: int, n: int) -> list[float]:
        metrics = []
        for i in range(start, start + n):  # dispatch all, then wait: the host never stalls the device
            self.state, m = self.step(self.params, self.state, self.batches[i % len(self.batches)])
            metrics.append(m["loss"])
        self.jax.block_until_ready((self.state, metrics))
        return [float(x) for x in metrics]

    def peak_flops(self, dtype: str) -> float:
        from jaxlora.training.metrics import measure_peak_flops
        if self.jax.default_backend() == "cpu":
            return measure_peak_flops()
        # a 2048^2 float32 matmul is too small for an accelerator: measure in the compute dtype at 8192^2
        return measure_peak_flops(n=8192, repeats=10, dtype=dtype)

    def device_memory_mb(self) -> float | None:
        stats = self.jax.devices()[0].memory_stats() or {}
        return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None


class PeftWorker:
    """PEFT + transformers: eager PyTorch forward/backward, AdamW over the LoRA parameters."""

    def __init__(self, args):
        import torch
        import transformers
        from peft import LoraConfig, get_peft_model

        self.torch = torch
        torch.set_num_threads(os.cpu_count())
        torch.manual_seed(args.seed)
        self.device = "cuda" if args.device == "gpu" else "cpu"
        dtype = getattr(torch, args.dtype)
        if args.model_path:
            model = transformers.AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype)
        else:
            cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config(args).items() if k != "architectures"})
            model = transformers.LlamaForCausalLM(cfg).to(dtype)
        model.config.use_cache = False
        self.model = model.to(self.device)
        self.batches = [{k: torch.from_numpy(v).long().to(self.device) for k, v in b.items()}
                        for b in _load_batches(args.batches_file)]
        self.loaded_mb = (status_kb("VmRSS") or 0) / 1024
        cfg = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=list(ALL_LINEAR),
                         use_dora=args.use_dora)
        self.model = get_peft_model(self.model, cfg)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.lora_params = sum(p.numel() for p in params)
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        self.autocast = args.dtype != "float32"
        self.compile_s = 0.0
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def _step(self, batch):
        torch = self.torch
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def run(self, start: int, n: int) -> list[float]:
        losses = [self._step(self.batches[i % len(self.batches)]) for i in range(start, start + n)]
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        return [float(x) for x in losses]

    def peak_flops(self, dtype: str) -> float | None:
        return None

    def device_memory_mb(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / 2**20 if self.device == "cuda" else None


def serve(args) -> None:
    """A worker: builds, warms up, then answers one JSON line per command read from stdin."""
    import logging
    logging.basicConfig(level=logging.WARNING)

    t0 = time.perf_counter()
    w = JaxWorker(args) if args.worker == "jaxlora" else PeftWorker(args)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm_losses = w.run(0, args.warmup)
    warm_s = time.perf_counter() - t0
    hwm_reset = reset_peak()
    reply({"build_s": build_s, "compile_s": w.compile_s, "warmup_s": warm_s, "warmup_losses": warm_losses,
           "loaded_rss_mb": w.loaded_mb, "lora_params": w.lora_params,
           "flops_per_token": getattr(w, "flops_per_token", None)})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "block":
            t0 = time.perf_counter()
            losses = w.run(cmd["start"], cmd["steps"])
            reply({"seconds": time.perf_counter() - t0, "losses": losses})
        elif cmd["op"] == "peak":
            reply({"peak_flops": w.peak_flops(args.dtype)})
        elif cmd["op"] == "finish":
            steady = status_kb("VmHWM") if hwm_reset else None
            reply({"peak_rss_mb": maxrss_kb() / 1024, "steady_rss_mb": steady / 1024 if steady else None,
                   "device_peak_mb": w.device_memory_mb(), "torch_threads": _torch_threads()})
            return


def _torch_threads():
    return sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None


class Worker(WorkerProcess):
    """The driver's handle on one worker subprocess."""

    def __init__(self, name: str, args, workdir: pathlib.Path, prep: dict):
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", name,
               "--batches-file", str(workdir / "batches.npz"), "--model-path", prep["model_path"] or ""]
        for k in ("model", "seq", "batch", "r", "alpha", "lr", "warmup", "steps", "blocks", "device", "dtype", "seed",
                  "loss_chunk"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        env = _worker_env(args)
        if name == "peft" and args.omp_wait_policy == "passive":
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        cmd += ["--set", *args.set] if args.set else []
        cmd += ["--attention-impl", args.attention_impl] if args.attention_impl else []
        cmd += ["--use-dora"] if args.use_dora else []
        super().__init__(name, cmd, env, workdir)


def _worker_env(args) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "force_host_platform_device_count" not in f)  # one device, as a plain run
    if args.device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env.pop("JAX_PLATFORMS", None)
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # device peak = what the step needs, not 75%
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# ------------------------------------------------------------------------------------------ driver


def run(args) -> dict:
    load_start = list(os.getloadavg())
    t_start = time.perf_counter()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench_throughput_"))
    prep = prepare(args, workdir)
    per_block = args.steps // args.blocks
    workers, ready = {}, {}
    try:
        for name in ("jaxlora", "peft"):  # built one after the other, not competing for the cores
            workers[name] = Worker(name, args, workdir, prep)
            ready[name] = workers[name].read()
            print(f"{name}: ready in {ready[name]['build_s']:.1f}s + warm-up {ready[name]['warmup_s']:.1f}s",
                  flush=True)
        blocks = {"jaxlora": [], "peft": []}
        peaks = []
        for b in range(args.blocks):
            order = ("jaxlora", "peft") if b % 2 == 0 else ("peft", "jaxlora")  # ABBA: drift hits both alike
            start = args.warmup + b * per_block
            for name in order:
                res = workers[name].ask(op="block", start=start, steps=per_block)
                blocks[name].append(res)
                print(f"block {b + 1} {name}: {res['seconds'] / per_block:.2f}s/step, losses "
                      + " ".join(f"{x:.4f}" for x in res["losses"]), flush=True)
            peaks.append(workers["jaxlora"].ask(op="peak")["peak_flops"])
        final = {name: w.ask(op="finish") for name, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    padded = args.batch * args.seq
    fpt = ready["jaxlora"]["flops_per_token"]
    peak = statistics.median(peaks)
    out = {}
    for name in ("jaxlora", "peft"):
        tps = [padded * per_block / r["seconds"] for r in blocks[name]]
        med = statistics.median(tps)
        out[name] = {"tokens_per_s": med, "tokens_per_s_blocks": tps,
                     "real_tokens_per_s": med * prep["real_tokens_per_batch"] / padded,
                     "step_s": padded / med, "mfu": med * fpt / peak if peak else None,
                     "losses": ready[name]["warmup_losses"] + [x for r in blocks[name] for x in r["losses"]],
                     **{k: ready[name][k] for k in ("build_s", "compile_s", "warmup_s", "loaded_rss_mb",
                                                     "lora_params")},
                     **final[name]}
    import shutil
    shutil.rmtree(workdir, ignore_errors=True)
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(),
            "versions": versions(), "load_start": load_start, "load_end": list(os.getloadavg()),
            "wall_s": time.perf_counter() - t_start, "model": _model_name(args), "data": prep["data"],
            "args": {k: getattr(args, k) for k in ("model", "seq", "batch", "r", "alpha", "lr", "warmup", "steps",
                                                   "blocks", "device", "dtype", "quick", "set",
                                                   "omp_wait_policy", "attention_impl", "loss_chunk", "use_dora")},
            "flops_per_token": fpt, "peak_flops": peak, "peak_flops_samples": peaks,
            "ratio_jaxlora_over_peft": out["jaxlora"]["tokens_per_s"] / out["peft"]["tokens_per_s"], **out}


def _model_name(args) -> str:
    if args.quick:
        return "tiny random Llama (2 layers, hidden 64, vocab 128)"
    if args.model == "llama1b":
        c = hf_config(args)
        return (f"random Llama ({c['num_hidden_layers']} layers, hidden {c['hidden_size']}, MLP "
                f"{c['intermediate_size']}, {c['num_attention_heads']}/{c['num_key_value_heads']} heads, vocab "
                f"{c['vocab_size']})")
    return "SmolLM2-135M-Instruct (real weights)" if args.model == "smollm2" else args.model


def table(res: dict) -> str:
    a, m, v = res["args"], res["machine"], res["versions"]
    gpu = a["device"] == "gpu"
    mem = "device peak MB" if gpu else "peak RSS MB | steady RSS MB | loaded RSS MB"
    lines = [
        "# LoRA training throughput: jaxlora vs PEFT", "",
        f"Model: {res['model']}, {a['dtype']}; {'DoRA' if a.get('use_dora') else 'LoRA'} r={a['r']}, alpha {a['alpha']:g}, dropout 0 on "
        f"{', '.join(ALL_LINEAR)}; batch {a['batch']} x {a['seq']} tokens; AdamW lr {a['lr']:g}; jaxlora "
        f"model.loss_chunk {a.get('loss_chunk', 0)}; data: {res['data']}.",
        f"Protocol: {a['warmup']} warm-up steps, then {a['steps']} timed steps per framework in {a['blocks']} "
        f"alternating blocks (ABBA); tokens/s = batch x seq / step time, median of blocks. PEFT worker: "
        f"{res['peft']['torch_threads']} torch threads, OMP_WAIT_POLICY {a['omp_wait_policy']}.",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['platform']}; device {a['device']}; load average "
        f"{res['load_start'][0]:.2f} / {res['load_start'][1]:.2f} / {res['load_start'][2]:.2f} (1/5/15 min) at start, "
        f"{res['load_end'][0]:.2f} / {res['load_end'][1]:.2f} / {res['load_end'][2]:.2f} at end; "
        f"{res['date']}; wall {res['wall_s']:.0f}s.",
        "Versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if x) + ".", "",
        f"| framework | tokens/s | non-pad tokens/s | s/step | blocks (tokens/s) | jaxlora / PEFT | MFU | {mem} "
        "| LoRA params | first loss |",
    ]
    lines.append("|---" * (lines[-1].count("|") - 1) + "|")
    for name in ("jaxlora", "peft"):
        x = res[name]
        mems = (f"{x['device_peak_mb']:.0f}" if gpu and x["device_peak_mb"] else "-") if gpu else \
            f"{x['peak_rss_mb']:.0f} | {x['steady_rss_mb'] or float('nan'):.0f} | {x['loaded_rss_mb']:.0f}"
        ratio = res["ratio_jaxlora_over_peft"] if name == "jaxlora" else 1.0
        mfu = f"{100 * x['mfu']:.1f}%" if x["mfu"] is not None else "-"
        lines.append(f"| {'jaxlora' if name == 'jaxlora' else 'PEFT + transformers'} | {x['tokens_per_s']:.0f} | "
                     f"{x['real_tokens_per_s']:.0f} | {x['step_s']:.2f} | "
                     f"{', '.join(f'{t:.0f}' for t in x['tokens_per_s_blocks'])} | {ratio:.2f} | {mfu} | {mems} | "
                     f"{x['lora_params']:,} | {x['losses'][0]:.4f} |")
    peak_what = "measure_peak_flops: float32 2048^3 matmul" if not gpu else f"{a['dtype']} 8192^3 matmul"
    j = res["jaxlora"]
    lines += ["", f"MFU: model FLOPs (`train_flops_per_token` = {res['flops_per_token'] / 1e6:.1f} MFLOP/token, "
              f"LoRA: no weight gradients for the frozen kernels) / measured peak {res['peak_flops'] / 1e9:.1f} "
              f"GFLOP/s ({peak_what}, median of {len(res['peak_flops_samples'])} samples between blocks: "
              + ", ".join(f"{p / 1e9:.0f}" for p in res["peak_flops_samples"]) + "). PEFT's MFU uses the same count.",
              f"jaxlora: compile {j['compile_s']:.1f}s (in the warm-up, not timed). Memory: "
              + ("device memory (jax peak_bytes_in_use, torch.cuda.max_memory_allocated)." if gpu else
                 "each framework runs in its own subprocess; peak = VmHWM over the whole life (load + compile + train), steady = "
                 "VmHWM reset after warm-up (timed steps only), loaded = RSS with model and batches in memory.")]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (real weights), llama1b (random ~1.2B), or a folder")
    p.add_argument("--set", nargs="*", default=None, help="llama1b config overrides key=value (CPU-sized runs)")
    p.add_argument("--data", default=None, help="JSONL with input/target (default: gsm_symbolic train)")
    p.add_argument("--seq", type=int, default=None, help="padded sequence length (default 256; llama1b 2048)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per framework (jaxlora compiles here)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per framework")
    p.add_argument("--blocks", type=int, default=4, help="alternating timed blocks per framework")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention-impl", choices=("xla", "cudnn"), default=None,
                   help="jaxlora's attention (cudnn: flash attention on NVIDIA GPUs, like torch's SDPA there)")
    p.add_argument("--omp-wait-policy", choices=("default", "passive"), default="default",
                   help="passive: OMP_WAIT_POLICY=PASSIVE for the PEFT worker (torch's OpenMP threads sleep instead of "
                        "spinning at barriers; far faster when the cores are shared with other processes)")
    p.add_argument("--quick", action="store_true", help="tiny random Llama, random tokens (smoke test)")
    p.add_argument("--use-dora", action="store_true", help="DoRA (magnitude + direction) in both frameworks")
    p.add_argument("--loss-chunk", type=int, default=0,
                   help="jaxlora's model.loss_chunk: tokens per chunk of the head in the loss (0: all logits at once)")
    p.add_argument("--real-data", action="store_true",
                   help="instead: one pass over real variable-length data, jaxlora packed/bucketed vs PEFT padded/"
                        "padding-free/packed (scripts/bench_realdata.py; its options apply, e.g. --examples)")
    p.add_argument("--out-md", default=str(ROOT / "docs" / "bench_throughput.md"))
    p.add_argument("--out-json", default=None, help="default: --out-md with .json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batches-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.seq is None:
        args.seq = 2048 if args.model == "llama1b" else 256
    if args.quick:
        args.seq, args.batch, args.steps, args.blocks, args.warmup = 32, 2, 4, 2, 1
    if args.steps % args.blocks:
        p.error(f"--steps {args.steps} must be a multiple of --blocks {args.blocks}")
    if args.dtype != "float32" and args.device == "cpu":
        p.error("--dtype bfloat16 is for --device gpu (CPU float32 is the compared setting)")
    if args.set and args.model != "llama1b":
        p.error("--set only applies to --model llama1b")
    return args


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--real-data" in argv:  # one pass over variable-length data, packed / bucketed / PEFT's collators
        import bench_realdata
        return bench_realdata.main([a for a in argv if a != "--real-data"])
    args = parse_args(argv)
    if args.worker:
        args.model_path = args.model_path or None
        serve(args)
        return {}
    res = run(args)
    md = table(res)
    out_md = pathlib.Path(args.out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(md)
    pathlib.Path(args.out_json or out_md.with_suffix(".json")).write_text(json.dumps(res, indent=1) + "\n")
    print(md)
    return res


if __name__ == "__main__":
    main()
