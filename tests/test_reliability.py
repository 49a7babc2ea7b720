"""A run you can trust (issue 16): what survives kill -9, SIGTERM, a corrupt checkpoint, a full disk, a second run on
the same folder, an export aimed at the run itself, and bad data or adapters. Every case runs on the tiny model in
seconds; every user error must be exit code 2 with one line on stderr (no traceback).

Exactness is bitwise: a run that was killed, stopped or fell back to an older checkpoint and was then resumed logs
the same losses, step for step, as one uninterrupted run (the reference, run once per module)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tiny
from jaxlora import cli
from jaxlora.training import data as data_lib
from jaxlora.training.metrics import read_metrics
from jaxlora.training.run_folder import RunLock, disk_full_message

ROOT = Path(__file__).resolve().parent.parent
STEPS = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny model, data, a run config (save every step, keep 3) and the losses of an uninterrupted run."""
    d = tmp_path_factory.mktemp("reliability")
    tiny.tiny_model_dir(d / "model")
    tiny.write_jsonl(d / "train.jsonl", tiny.instruction_records(64))
    cfg = d / "run.yaml"
    cfg.write_text(f"""
model: {{path: {d}/model}}
lora: {{r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj], init_lora_weights: false}}
data: {{path: {d}/train.jsonl, max_length: 32, bucket_lengths: [32]}}
optim: {{learning_rate: 1.0e-3}}
train: {{output_dir: {d}/reference, micro_batch_size: 8, max_steps: {STEPS}, save_every: 1, keep_checkpoints: 3, log_every: 1,
         progress_bar: false, peak_tflops_per_device: 1}}
""")
    assert cli.main(["train", "--config", str(cfg)]) == 0
    return d, cfg, losses(d / "reference")


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def train(cfg: Path, out: Path, *extra: str) -> int:
    return cli.main(["train", "--config", str(cfg), "--set", f"train.output_dir={out}", *extra])


def one_error_line(capsys, needle: str) -> str:
    """The stderr of a failed command: its last line is the error, naming `needle`; no traceback anywhere."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("jaxlora ") and "error:" in last and needle in last, err
    return last


def start_cli(cfg: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    return subprocess.Popen([sys.executable, "-m", "jaxlora.cli", "train", "--config", str(cfg), "--set",
                             f"train.output_dir={out}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if (out / "metrics.jsonl").exists() and any(r.get("step", 0) >= step for r in read_metrics(out)):
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout} s")


# --- preemption and crashes -------------------------------------------------------------------------------------


def test_kill_9_then_resume_is_exact(world):
    """kill -9 in the middle of a run (a checkpoint save may be in flight): the lock dies with the process, the
    rerun resumes from the last complete checkpoint, marks the resume in metrics.jsonl and ends on the reference's
    losses bit for bit."""
    d, cfg, reference = world
    out = d / "killed"
    proc = start_cli(cfg, out)
    wait_for_step(out, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert train(cfg, out) == 0
    assert losses(out) == reference
    records = read_metrics(out)
    assert any(r.get("event") == "resumed" for r in records)
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)) == list(range(1, STEPS + 1))  # re-run steps replace the killed run's


def test_sigterm_saves_then_resume_is_exact(world, capsys):
    """SIGTERM (preemption) in the middle of a run: the step in flight finishes, a checkpoint of it is saved, one
    line says where to resume, exit code 143; the rerun continues from exactly there. (In-process: the signal is
    sent to this process by a thread once step 2 is logged; the handler runs in the main thread as it would.)"""
    import threading
    d, cfg, reference = world
    out = d / "preempted"

    def preempt():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if (out / "metrics.jsonl").exists() and any(r.get("step", 0) >= 2 for r in read_metrics(out)):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    threading.Thread(target=preempt, daemon=True).start()
    assert train(cfg, out) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "stopped by SIGTERM after step" in line and "resume" in line, err
    stopped = int(line.split("after step ")[1].split()[0])
    assert 2 <= stopped < STEPS
    assert max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == stopped
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone once train returns
    assert train(cfg, out) == 0
    assert losses(out) == reference


def test_second_signal_exits_at_once(tmp_path):
    """The first SIGINT is a request; the second exits immediately with 128 + SIGINT and one line."""
    code = ("import os, signal, time\nfrom jaxlora.training.preemption import StopSignals\n"
            "with StopSignals() as s:\n    os.kill(os.getpid(), signal.SIGINT)\n    assert s.received == 'SIGINT'\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(5)\nprint('not reached')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGINT and "not reached" not in proc.stdout
    assert "second SIGINT" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# --- checkpoints ---------------------------------------------------------------------------------------------------


def corrupt(step_dir: Path, how: str) -> None:
    files = sorted((p for p in step_dir.rglob("*") if p.is_file() and p.stat().st_size > 64),
                   key=lambda p: p.stat().st_size)
    if how == "emptied":
        for p in sorted(step_dir.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
    elif how == "truncated":
        data = files[-1].read_bytes()
        files[-1].write_bytes(data[: len(data) // 2])
    else:  # one bit flipped in every data file
        for p in files:
            data = bytearray(p.read_bytes())
            data[len(data) // 2] ^= 0x10
            p.write_bytes(bytes(data))


def copy_run(src: Path, dst: Path, until: int) -> None:
    """A run that stopped after step `until`: the reference's folder without the later checkpoints and metrics."""
    import shutil
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".jaxlora.lock"))
    for p in (dst / "checkpoints").iterdir():
        if p.name.isdigit() and int(p.name) > until:
            shutil.rmtree(p)
    records = [r for r in read_metrics(dst) if r.get("step", 0) <= until]
    (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize("how", ["truncated", "bitflip", "emptied"])
def test_corrupt_newest_checkpoint_falls_back(world, caplog, capsys, how):
    """The newest checkpoint damaged: `eval` stops with one line naming it and --step; `train` moves it to
    corrupt-checkpoints/, says so, resumes from the newest intact one and ends on the reference's losses."""
    d, cfg, reference = world
    out = d / f"corrupt-{how}"
    copy_run(d / "reference", out, until=STEPS - 1)
    corrupt(out / "checkpoints" / str(STEPS - 1), how)
    if how != "bitflip":  # a flipped bit in a compressed chunk may still decode: only load it through train
        assert cli.main(["eval", "--config", str(cfg), "--set", f"train.output_dir={out}", "--set",
                         f"data.eval_path={d}/train.jsonl"]) == 2
        one_error_line(capsys, f"--step {STEPS - 2}")
    assert train(cfg, out) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err
    restored = losses(out)
    if how != "bitflip" or (out / "corrupt-checkpoints").exists():
        assert (out / "corrupt-checkpoints" / str(STEPS - 1)).is_dir()
        assert "checkpoint" in caplog.text and "unreadable" in caplog.text
    assert restored == reference


def test_resume_step_moves_newer_checkpoints_aside(world):
    d, cfg, reference = world
    out = d / "resume-step"
    copy_run(d / "reference", out, until=STEPS - 1)
    assert train(cfg, out, "--resume-step", str(STEPS - 2)) == 0
    assert sorted(p.name for p in (out / "superseded-checkpoints").iterdir()) == [str(STEPS - 1)]
    assert losses(out) == reference


def test_refused_resume_keeps_config_and_checkpoints(world, capsys):
    """A resume refused (another lora_alpha changes the model's function) leaves config.yaml byte for byte; the
    checkpoint keeps the config it was made with."""
    d, cfg, _ = world
    out = d / "refused"
    copy_run(d / "reference", out, until=STEPS - 1)
    before = (out / "config.yaml").read_bytes()
    assert train(cfg, out, "--set", "lora.lora_alpha=16") == 2
    one_error_line(capsys, "lora_alpha")
    assert (out / "config.yaml").read_bytes() == before
    meta = json.loads((out / "checkpoints" / str(STEPS - 1) / "meta" / "metadata").read_text())
    assert meta["config"]["lora"]["lora_alpha"] == 8 and meta["step"] == STEPS - 1


def test_second_run_on_the_same_folder_is_refused(world, capsys):
    d, cfg, _ = world
    out = d / "locked"
    out.mkdir()
    holder = RunLock(out)
    try:
        assert train(cfg, out) == 2
        line = one_error_line(capsys, "in use by another jaxlora run")
        assert f"pid {os.getpid()}" in line
        assert not (out / "config.yaml").exists() and not (out / "metrics.jsonl").exists()
    finally:
        holder.release()


def test_export_onto_the_run_or_the_model_is_refused(world, capsys):
    d, cfg, _ = world
    run = d / "reference"
    for fmt in ("merged", "peft"):
        for target in (run, run / "checkpoints", run / "checkpoints" / str(STEPS) / "x", d / "model", d):
            args = ["export", "--config", str(cfg), "--format", fmt, "--out", str(target), "--overwrite"]
            assert cli.main(args) == 2
            one_error_line(capsys, "would delete it")
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [STEPS - 2, STEPS - 1, STEPS]
    out = d / "exported"
    assert cli.main(["export", "--config", str(cfg), "--format", "peft", "--out", str(out)]) == 0
    assert out.stat().st_mode & 0o777 == 0o777 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- full disks ------------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (needs root or CAP_SYS_ADMIN; skipped otherwise)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(disk: Path, leave: int) -> None:
    """Fills the filesystem until `leave` bytes are free."""
    import shutil
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(b"\0" * max(free - leave, 0))


@pytest.mark.parametrize("leave", [0, 40_000])
def test_full_disk_during_training_is_one_line(world, small_disk, capsys, leave):
    """Out of space before anything is written, or during the checkpoints: one line naming the path and the free
    space; whatever checkpoints completed stay loadable."""
    d, cfg, _ = world
    fill(small_disk, leave)
    assert train(cfg, small_disk / "run") == 2
    line = one_error_line(capsys, "no space left")
    assert str(small_disk) in line and "MiB free" in line


def test_full_disk_export_and_tokenization_cache(world, small_disk, capsys):
    d, cfg, _ = world
    fill(small_disk, 0)
    assert cli.main(["export", "--config", str(cfg), "--out", str(small_disk / "merged")]) == 2
    one_error_line(capsys, "no space left")
    assert not [p for p in small_disk.iterdir() if p.name != "filler"]  # no half-written export left behind
    assert train(cfg, d / "cache-full", "--set", f"data.cache_dir={small_disk}/cache") == 2
    one_error_line(capsys, "no space left")


def test_disk_full_found_deep_in_a_chain():
    """orbax's async writers wrap the OSError in other exceptions: the message still finds it."""
    try:
        try:
            raise OSError(28, "No space left on device", "/data/run/checkpoints/7/state/file")
        except OSError as e:
            raise RuntimeError("async commit failed") from e
    except RuntimeError as outer:
        msg = disk_full_message(outer, None)
    assert msg.startswith("no space left on the device holding /data/run/checkpoints/7/state/file")
    assert disk_full_message(ValueError("x"), None) is None


# --- data and adapters -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.tiny_tokenizer()


def load(tmp_path, tokenizer, text: bytes | str, **cfg):
    path = tmp_path / "data.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return data_lib.load_tokenized(data_lib.DataConfig(path=str(path), **cfg), tokenizer)


def test_dropped_examples_are_named_and_counted(tmp_path, tokenizer):
    long_prompt = {"input": "what is " + "one plus " * 30 + "two ?", "target": "three"}
    recs = [tiny.instruction_records(1)[0], long_prompt, tiny.instruction_records(1, seed=2)[0], long_prompt]
    data = load(tmp_path, tokenizer, "".join(json.dumps(r) + "\n" for r in recs), max_length=16)
    assert (data.num_examples, data.num_dropped) == (2, 2)
    assert data.dropped == (f"{tmp_path / 'data.jsonl'}:2", f"{tmp_path / 'data.jsonl'}:4")
    with pytest.raises(data_lib.DataError, match=r"all 2 train examples were dropped: none keeps a labelled token "
                                                 r"within data.max_length=16 .*data.jsonl:1"):
        load(tmp_path, tokenizer, "".join(json.dumps(long_prompt) + "\n" for _ in range(2)), max_length=16)


@pytest.mark.parametrize("text,needle", [
    (b"", "the file is empty"),
    (b"\n  \n", "the file is empty"),
    (b'{"input": "what is one", "target": "two"}\n{"input": "caf\xe9", "target": "x"}\n',
     r"data.jsonl:2: not UTF-8 text \(byte 0xe9 at column 15\)"),
    (b'{"input": ["what", "is"], "target": "two"}\n', r"data.jsonl:1: field 'input' is a list"),
])
def test_bad_data_is_one_clear_error(tmp_path, tokenizer, text, needle):
    with pytest.raises(data_lib.DataError, match=needle):
        load(tmp_path, tokenizer, text)


@pytest.fixture(scope="module")
def adapter(world):
    d, cfg, _ = world
    out = d / "adapter-src"
    assert cli.main(["export", "--config", str(cfg), "--format", "peft", "--out", str(out)]) == 0
    return d, out


@pytest.mark.parametrize("case,needle", [
    ("alpha", "lora_alpha is 'sixteen'; expected a number"),
    ("array", "must hold one JSON object"),
    ("nan", "non-finite values"),
])
def test_bad_adapters_are_one_line(adapter, tmp_path, capsys, case, needle):
    import shutil
    from safetensors.numpy import load_file, save_file
    d, src = adapter
    bad = tmp_path / case
    shutil.copytree(src, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    if case == "alpha":
        (bad / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": "sixteen"}))
    elif case == "array":
        (bad / "adapter_config.json").write_text(json.dumps([config]))
    else:
        tensors = load_file(bad / "adapter_model.safetensors")
        key = next(k for k in sorted(tensors) if "lora_A" in k)
        tensors[key] = tensors[key].copy()
        tensors[key][0, 0] = np.nan
        save_file(tensors, bad / "adapter_model.safetensors")
    assert cli.main(["import-peft", "--model", str(d / "model"), "--adapter", str(bad)]) == 2
    one_error_line(capsys, needle)


def test_throughput_excludes_checkpoint_and_eval_time(tmp_path, monkeypatch):
    """The time spent saving or evaluating between two steps is not in the next step's tokens/s (the step after a
    save used to read the save's time, and the others 1.6-3.9x the run's average)."""
    from jaxlora.training import metrics
    clock = iter([0.0, 1.0, 1.0, 11.0, 12.0, 13.0])  # step 1, step 2, save from 1 to 11 s, step 3 at 12, step 4 at 13
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    logger = metrics.MetricsLogger(tmp_path, 4, 0, progress_bar=False)
    logger.log_step(1, {"loss": 1.0}, 100, None)
    logger.log_step(2, {"loss": 1.0}, 100, None)
    with logger.not_training():
        pass
    logger.log_step(3, {"loss": 1.0}, 100, None)
    logger.log_step(4, {"loss": 1.0}, 100, None)
    logger.close()
    rates = [r["tokens_per_second"] for r in read_metrics(tmp_path) if "tokens_per_second" in r]
    assert rates == [100.0, 100.0, 100.0] and logger.tokens_per_second() == 100.0


def test_float16_on_cpu_is_refused_in_one_line(world, capsys):
    d, cfg, _ = world
    assert train(cfg, d / "fp16", "--set", "model.dtype=float16") == 2
    one_error_line(capsys, "float16 does not run on CPU")


def test_loss_scale_exhausted_stops_and_names_the_step(world, monkeypatch, capsys):
    """float16 gradients that overflow even at loss_scale_min (the step reports loss_scale_exhausted): the run
    stops there, names the step and keeps the last good checkpoint, as DeepSpeed raises."""
    from jaxlora.training import step as step_lib
    d, cfg, reference = world
    real = step_lib.make_train_step

    def exhausting(*args, **options):
        step = real(*args, **options)

        def train_step(params, state, batch):
            new, metrics = step(params, state, batch)
            return new, {**metrics, "loss_scale_exhausted": (state.step == 3).astype("float32")}
        return train_step

    monkeypatch.setattr(step_lib, "make_train_step", exhausting)
    out = d / "exhausted"
    assert train(cfg, out) == 2
    line = one_error_line(capsys, "overflow at step 4 even at the minimum loss scale")
    assert "Last good checkpoint: step 3" in line
    assert losses(out) == {s: reference[s] for s in (1, 2, 3)}
