"""End-to-end smoke of every entry point on a tiny model in a temp dir: train (with a checkpoint), resume-free
eval, merged export loaded by transformers, and user errors as one line with exit code 2. Also: every shipped
config in configs/ parses against the schema."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import tiny
from jaxlora import backends, cli
from jaxlora.config import RunConfig, load_run_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    assert isinstance(load_run_config(str(path)), RunConfig)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    tiny.tiny_model_dir(d / "model")
    tiny.write_jsonl(d / "train.jsonl", tiny.instruction_records(64))
    tiny.write_jsonl(d / "eval.jsonl", tiny.instruction_records(16, seed=1))
    cfg = d / "run.yaml"
    cfg.write_text(f"""
model: {{path: {d}/model}}
lora: {{r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj], init_lora_weights: false}}
data: {{path: {d}/train.jsonl, eval_path: {d}/eval.jsonl, max_length: 32, bucket_lengths: [32]}}
optim: {{learning_rate: 1.0e-3}}
train: {{output_dir: {d}/run, micro_batch_size: 8, max_steps: 3, save_every: 2, log_every: 1, progress_bar: false}}
mesh: {{fsdp: 2}}
""")
    assert cli.main(["train", "--config", str(cfg)]) == 0
    return d, cfg


def test_train_writes_adapter_checkpoints_metrics(run):
    d, _ = run
    out = d / "run"
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss"' in line for line in lines) == 3 and sum("eval_loss" in line for line in lines) == 1


def test_eval_and_merged_export_load_in_transformers(run, capsys):
    d, cfg = run
    assert cli.main(["eval", "--config", str(cfg)]) == 0
    assert '"eval_loss"' in capsys.readouterr().out
    assert cli.main(["export", "--config", str(cfg), "--out", str(d / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(d / "merged", dtype=torch.float32).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(d / "model", dtype=torch.float32).eval()
    # init_lora_weights=false makes b non-zero, so the merged weights must differ from the base in q/v only
    q_m = merged.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q_m, base.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(merged.model.layers[0].self_attn.k_proj.weight, base.model.layers[0].self_attn.k_proj.weight)
    ids = torch.tensor(np.arange(10)[None] % 100)
    assert torch.isfinite(merged(ids).logits).all()


@pytest.mark.parametrize("override,needle", [
    ("optim.lerning_rate=1", "unknown key 'optim.lerning_rate'"),
    ("train.max_steps=abc", "train.max_steps"),
    ("lora.target_modules=[nope_proj]", "matches no module"),
    ("lora.r=100", "larger than a dimension"),
    ("model.path=/does/not/exist", "does not exist"),
])
def test_user_errors_are_one_line(run, capsys, override, needle):
    _, cfg = run
    assert cli.main(["train", "--config", str(cfg), "--set", override, "--set", "train.output_dir=/tmp/x"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_no_tpu_messages_on_a_host_without_tpu(tmp_path):
    """libtpu is installed for `jaxlora plan`; a command on a CPU/GPU host with JAX_PLATFORMS unset, as a user runs
    it, must not print libtpu's failed TPU probing ("Failed to find host bounds ...", "unexpected worker hostname")."""
    if backends.tpu_present():
        pytest.skip("this host has TPU chips: TPU messages are expected here")
    model = tiny.tiny_model_dir(tmp_path / "model")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    proc = subprocess.run([sys.executable, "-m", "jaxlora.cli", "generate", "--model", str(model), "--prompt", "1 + 1",
                           "--max-new-tokens", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert '"completion"' in proc.stdout
    tpu_lines = [line for line in proc.stderr.splitlines() if re.search(r"\btpu|libtpu", line, re.IGNORECASE)]
    assert not tpu_lines, proc.stderr


@pytest.mark.parametrize("fmt", ["merged", "peft"])
def test_export_to_an_existing_file_is_one_line(run, capsys, fmt):
    d, cfg = run
    target = d / f"a_file_{fmt}.txt"
    target.write_text("keep me")
    for out, extra in ((target, []), (target, ["--overwrite"]), (target / "sub", [])):
        assert cli.main(["export", "--config", str(cfg), "--format", fmt, "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(target) in err and "not a folder" in err, err
    assert target.read_text() == "keep me" and not list(d.glob(f".{target.name}*"))


def test_generate_default_length_is_the_apis():
    """`jaxlora generate` and `jaxlora.generate` / `generate_ids` default to the same number of new tokens."""
    import inspect
    from jaxlora import generation
    args = cli._parser().parse_args(["generate", "--model", "m", "--prompt", "p"])
    api = {inspect.signature(f).parameters["max_new_tokens"].default
           for f in (generation.generate, generation.generate_ids)}
    assert api == {args.max_new_tokens} == {generation.DEFAULT_MAX_NEW_TOKENS}


def test_cli_shows_info_and_says_where_it_resumed(tmp_path):
    """INFO from jaxlora's loggers reaches stderr by default on the CLI whatever orbax/absl set up, and a resumed run
    says where it resumed (issue 16 item 8)."""
    tiny.tiny_model_dir(tmp_path / "model")
    tiny.write_jsonl(tmp_path / "train.jsonl", tiny.instruction_records(16))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
model: {{path: {tmp_path}/model}}
lora: {{r: 4, target_modules: [q_proj]}}
data: {{path: {tmp_path}/train.jsonl, max_length: 32, bucket_lengths: [32]}}
train: {{output_dir: {tmp_path}/run, micro_batch_size: 8, max_steps: 1, progress_bar: false,
         peak_tflops_per_device: 1}}
""")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # orbax (absl) imported before the CLI sets up logging, as when jaxlora's modules are already loaded: it leaves a
    # WARNING-level root handler that logging.basicConfig does not replace
    entry = "import sys, orbax.checkpoint; from jaxlora import cli; sys.exit(cli.main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", entry, "train", "--config", str(cfg)]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "training 1 steps" in first.stderr, first.stderr  # INFO without -v
    second = subprocess.run(cmd + ["--set", "train.max_steps=2"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stderr
    assert f"resumed from {tmp_path / 'run' / 'checkpoints'} at step 1" in second.stderr, second.stderr
