"""`jaxlora plan`: AOT compilation of the real train step and LoRA-GA steps, on the 8-device CPU mesh (always) and
on a compile-only TPU topology from libtpu (CI installs it; JAXLORA_NO_TPU_AOT=1 skips that part explicitly)."""

import json
import os

import dataclasses

import pytest

from jaxlora import plan as plan_lib
from jaxlora.cli import main
from jaxlora.config import ModelConfig, RunConfig, TrainConfig
from jaxlora.training.data import DataConfig
from jaxlora.lora import LoraConfig
from jaxlora.sharding import MeshConfig

TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128, hidden_size=64,
            intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)


def tiny_config(**train) -> RunConfig:
    return RunConfig(model=ModelConfig(path="tiny"), lora=LoraConfig(r=4, target_modules="all-linear"),
                     data=DataConfig(max_length=32), train=TrainConfig(**{"micro_batch_size": 8, **train}))


@pytest.fixture(scope="module")
def cpu_report():
    return plan_lib.plan(tiny_config(), "cpu8", hf_config=TINY, max_micro_batch=4)


def test_cpu_plan_reports_memory_fit_and_largest_micro_batch(cpu_report):
    r = cpu_report
    assert r.mesh == {"data": 8, "fsdp": 1, "tensor": 1} and r.seq_len == 32
    t = r.train
    assert t.fits and t.per_chip == 1 and t.rows == 8
    assert all(t.parts[k] > 0 for k in ("weights", "adapters", "optimizer", "batch"))
    assert t.peak >= t.parts["weights"] + t.parts["adapters"] + t.parts["optimizer"]
    # Adam keeps two moments per adapter leaf (plus replicated counters)
    assert t.parts["optimizer"] >= 2 * t.parts["adapters"]
    assert t.flops > 0 and t.flops_xla and t.flops_xla > 0
    assert r.largest is not None and r.largest.fits and r.largest.per_chip == 4  # the search's cap
    for p in (r.lora_ga_exact, r.lora_ga_streaming):  # 4 packed 2-example batches: 1 row per chip
        assert p.fits and p.peak > 0 and p.rows == 8 and p.per_chip == 1 and p.parts["batch"] > 0
    # exact estimation holds a float32 gradient of every adapted kernel; the sketches are rank-q factors
    assert r.lora_ga_exact.parts["accumulators"] > 0 and r.lora_ga_streaming.parts["sketches"] > 0
    text = r.format()
    assert "fits" in text and "largest that fits" in text and "LoRA-GA exact" in text


def test_memory_grows_with_micro_batch(cpu_report):
    small, large = cpu_report.train, cpu_report.largest
    assert large.per_chip > small.per_chip
    assert large.memory.temp > small.memory.temp
    assert large.parts["batch"] == small.parts["batch"] * large.per_chip // small.per_chip
    assert large.flops == pytest.approx(small.flops * large.per_chip / small.per_chip)


def test_impossible_budget_says_how_far_over():
    r = plan_lib.plan(tiny_config(), "cpu8", hf_config=TINY, hbm_bytes=1024, lora_ga_steps=False)
    assert not r.fits and r.largest is None
    assert "does not fit: micro-batch 1 per chip needs" in r.message and " over " in r.message
    assert r.train.over_bytes == r.train.peak - 1024 > 0


@pytest.mark.parametrize("name, fragment", [("v9-32", "unknown TPU target"), ("v5p-33", "multiple of 2"),
                                            ("v5p-24", "grid"), ("tpu-big", "unknown target"),
                                            ("v5e:2x2x2", "2 dimensions")])
def test_bad_target_names_list_valid_forms(name, fragment):
    with pytest.raises(plan_lib.PlanError, match=fragment) as e:
        plan_lib.resolve_target(name)
    assert "v5p-32" in str(e.value) or "topology" in str(e.value)


def test_target_names_resolve_to_libtpu_topologies():
    assert plan_lib.resolve_target("v5p-32").topology == "v5:2x2x4"
    assert plan_lib.resolve_target("v4-32").topology == "v4:2x2x4"
    assert plan_lib.resolve_target("v5e-16").topology == plan_lib.resolve_target("v5litepod-16").topology == "v5e:4x4"
    two = plan_lib.resolve_target("v5p-32", num_slices=2)
    assert two.num_devices == 32 and two.hbm_bytes == 95 * plan_lib.GiB


def test_mesh_that_does_not_divide_the_devices():
    with pytest.raises(plan_lib.PlanError, match="product is 8"):
        plan_lib.plan(tiny_config(), "cpu8", hf_config=TINY, mesh=MeshConfig(data=3, fsdp=1))
    with pytest.raises(plan_lib.PlanError, match="multiple of the mesh's data x fsdp = 8"):
        plan_lib.plan(tiny_config(micro_batch_size=4), "cpu8", hf_config=TINY)


def test_cli_plan(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY))
    cfg = tmp_path / "plan.yaml"
    cfg.write_text(f"model:\n  path: {model}\nlora:\n  r: 4\n  target_modules: all-linear\ndata:\n  max_length: 32\n"
                   "train:\n  micro_batch_size: 8\n")
    assert main(["plan", "--config", str(cfg), "--target", "cpu8", "--no-search", "--no-lora-ga"]) == 0
    assert "LoRA train step, micro-batch 1/chip" in capsys.readouterr().out
    assert main(["plan", "--config", str(cfg), "--target", "v7x-8"]) == 2
    assert "valid forms" in capsys.readouterr().err


def _libtpu_or_fail():
    try:
        import libtpu  # noqa: F401
    except ImportError:
        if os.environ.get("JAXLORA_NO_TPU_AOT") == "1":
            pytest.skip("JAXLORA_NO_TPU_AOT=1: TPU ahead-of-time compilation not tested (libtpu not installed)")
        pytest.fail(f"libtpu is not installed, so TPU AOT compilation cannot be tested: {plan_lib.LIBTPU_PIP} "
                    f"(or set JAXLORA_NO_TPU_AOT=1 to skip this test explicitly)")


def test_tiny_model_on_tiny_tpu_topology():
    _libtpu_or_fail()
    r = plan_lib.plan(tiny_config(), "v5e-4", hf_config=TINY, micro_batch=1, search=False)
    assert r.target.topology == "v5e:2x2" and r.mesh == {"data": 4, "fsdp": 1, "tensor": 1}
    assert r.train.fits and r.train.peak > r.train.parts["weights"] > 0
    assert r.lora_ga_exact.fits and r.lora_ga_streaming.fits
    # far beyond a v5e chip's 16 GiB: the TPU compiler refuses (RESOURCE_EXHAUSTED) and the plan says by how much
    big = plan_lib.plan(tiny_config(), "v5e-4", hf_config=TINY, micro_batch=2 ** 20, search=False,
                        lora_ga_steps=False)
    assert not big.train.fits and big.train.memory is None and big.train.over_bytes > 0


def test_optimizer_offload_moves_state_to_host_on_tpu():
    """optim.offload_state on a TPU compile: the Adam moments leave the chip's arguments/outputs for pinned host
    memory (memory_analysis reports them as host bytes)."""
    _libtpu_or_fail()
    base = tiny_config()
    plans = {}
    for offload in (False, True):
        cfg = dataclasses.replace(base, optim=dataclasses.replace(base.optim, offload_state=offload))
        plans[offload] = plan_lib.plan(cfg, "v5e-4", hf_config=TINY, micro_batch=1, search=False,
                                       lora_ga_steps=False).train
    on_device, offloaded = plans[False], plans[True]
    opt = on_device.parts["optimizer"]
    assert offloaded.parts["optimizer (host)"] == opt and on_device.memory.host == 0
    assert offloaded.memory.host >= opt
    assert offloaded.memory.argument <= on_device.memory.argument - opt
