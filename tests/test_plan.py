"""`jaxlora plan`: AOT compilation of the real train step and LoRA-GA steps, on the 8-device CPU mesh (always) and
on a compile-only TPU topology from libtpu (CI installs it; JAXLORA_NO_TPU_AOT=1 skips that part explicitly)."""

import json
import math
import os

import dataclasses

import jax
import pytest
from flax import traverse_util

from jaxlora import plan as plan_lib
from jaxlora.cli import main
from jaxlora.config import ModelConfig, RunConfig, TrainConfig
from jaxlora.training.data import DataConfig
from jaxlora.lora import LoraConfig
from jaxlora.plan import command as command_lib, search as search_lib
from jaxlora.sharding import MeshConfig, make_mesh

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
    # found by prediction: the line through 1 and 2 rows/chip reaches past the cap, one compile confirms it
    s = r.largest_search
    assert s.method == "predicted" and [m for m, _, _ in s.compiled] == [1, 2, 4] and s.capped
    assert s.line[1] > 0
    for p in (r.lora_ga_exact, r.lora_ga_streaming):  # 4 packed 2-example batches: 1 row per chip
        assert p.fits and p.peak > 0 and p.rows == 8 and p.per_chip == 1 and p.parts["batch"] > 0
    # exact estimation holds a float32 gradient of every adapted kernel; the sketches are rank-q factors
    assert r.lora_ga_exact.parts["accumulators"] > 0 and r.lora_ga_streaming.parts["sketches"] > 0
    text = r.format()
    assert "fits" in text and "largest that fits" in text and "LoRA-GA exact" in text
    assert "search (predicted): compiled 1, 2, 4/chip (3 compiles)" in text and "the cap 4/chip fits" in text


def test_memory_grows_with_micro_batch(cpu_report):
    small, large = cpu_report.train, cpu_report.largest
    assert large.per_chip > small.per_chip
    assert large.memory.temp > small.memory.temp
    assert large.parts["batch"] == small.parts["batch"] * large.per_chip // small.per_chip
    assert large.flops == pytest.approx(small.flops * large.per_chip / small.per_chip)


def _fake_train(peak_of, refused_above=None):
    """A train step whose compiled peak at m rows/chip is peak_of(m); past `refused_above` the compiler refuses."""
    def train(m):
        refused = refused_above is not None and m > refused_above
        memory = None if refused else plan_lib.Memory(0, 0, 0, int(peak_of(m)), 0)
        return plan_lib.StepPlan("train", m, m, 32, not refused, memory, {}, 0.0, None, 0.0)
    return train


@pytest.mark.parametrize("curve", ["linear", "convex", "concave", "step", "refused"])
def test_predicted_search_agrees_with_exhaustive_on_memory_curves(curve):
    """The prediction finds what compiling every candidate finds, on curves a line only approximates, with fewer
    compiles; what it did not compile it says it predicted."""
    peak_of = {"linear": lambda m: 1000 + 100 * m, "convex": lambda m: 1000 + 90 * m + 0.5 * m * m,
               "concave": lambda m: 1000 + 120 * m - 0.3 * m * m, "step": lambda m: 1000 + 100 * m + 400 * (m > 12),
               "refused": lambda m: 1000 + 100 * m}[curve]
    refused = 30 if curve == "refused" else None
    total_pred = total_exh = 0
    for budget in range(1150, 6000, 37):
        exh = search_lib.exhaustive(_fake_train(peak_of, refused), budget, cap=64)
        pred = search_lib.predicted(_fake_train(peak_of, refused), budget, cap=64)
        assert pred.largest == exh.largest, (budget, pred, exh)
        assert peak_of(pred.largest) <= budget
        assert pred.capped or pred.largest == refused or peak_of(pred.largest + 1) > budget
        if not pred.next_compiled and not pred.capped:  # predicted by a line through two compiles
            assert pred.line is not None and pred.next_peak > budget
        total_pred, total_exh = total_pred + len(pred.compiled), total_exh + len(exh.compiled)
    assert total_pred < total_exh * 0.7


def test_predicted_search_picks_the_exhaustive_micro_batch_on_a_compiled_step():
    """On the tiny model's compiled train step (cpu8): the same micro-batch as the exhaustive search, in fewer
    compiles. Both searches share one planner, so each micro-batch compiles once."""
    tgt = plan_lib.resolve_target("cpu8")
    planner = plan_lib.Planner(tiny_config(), make_mesh(MeshConfig(), plan_lib.target_devices(tgt)), None,
                               tgt.hbm_bytes, TINY)
    one, two = planner.train(1).peak, planner.train(2).peak
    budget = int(one + 2.5 * (two - one))  # between 3 and 4 rows/chip on the line through 1 and 2
    exh = search_lib.exhaustive(planner.train, budget, cap=8)
    pred = search_lib.predicted(planner.train, budget, cap=8)
    assert pred.largest == exh.largest >= 2
    assert len(pred.compiled) < len(exh.compiled)
    assert pred.next_peak > budget >= planner.train(pred.largest).peak


def _shard_bytes(tree, shardings) -> int:
    """Per-chip bytes of `tree` (ShapeDtypeStructs, QArrays of them) in `shardings`."""
    leaves = jax.tree.leaves(tree)
    return sum(math.prod(sh.shard_shape(x.shape)) * x.dtype.itemsize
               for x, sh in zip(leaves, jax.tree.leaves(shardings)))


def test_qlora_plan_compiles_the_quantized_base():
    """model.quantization: nf4 (double quant) plans the quantized model: the compiled train step's arguments are
    the dense plan's less exactly the block kernels' dense bytes plus their nf4 codes and scales (per chip, fsdp
    sharded), which are ~4.5/32 of the float32 kernels (4-bit codes + an f32 absmax per 64; down_proj's 96 inputs
    padded to 128); LoRA-GA's exact estimation accumulates float32 gradients of the dense kernels."""
    from jaxlora.plan.compile import planned_model
    tgt = plan_lib.resolve_target("cpu8")
    mesh = make_mesh(MeshConfig(data=2, fsdp=4), plan_lib.target_devices(tgt))
    dense_cfg = tiny_config(micro_batch_size=2)
    nf4_cfg = dataclasses.replace(dense_cfg, model=dataclasses.replace(dense_cfg.model, quantization="nf4",
                                                                       double_quant=True))
    dense, nf4 = (plan_lib.Planner(c, mesh, None, tgt.hbm_bytes, TINY) for c in (dense_cfg, nf4_cfg))
    model = nf4.model
    assert model.quantization.kind == "nf4" and model.quantized_paths
    assert planned_model(dense_cfg, mesh, None, TINY).quantization is None
    flat_q, flat_qs, flat_d, flat_ds = (traverse_util.flatten_dict(t) for t in (
        model.abstract_params, model.param_shardings, model.dense_abstract_params, model.dense_param_shardings))
    q_bytes = sum(_shard_bytes(flat_q[p], flat_qs[p]) for p in model.quantized_paths)
    d_bytes = sum(_shard_bytes(flat_d[p], flat_ds[p]) for p in model.quantized_paths)
    assert 4.5 / 32 < q_bytes / d_bytes < 4.5 / 32 * 128 / 96 + 0.01, (q_bytes, d_bytes)
    plans = {"dense": dense.train(1), "nf4": nf4.train(1)}
    assert plans["nf4"].memory.argument == plans["dense"].memory.argument - d_bytes + q_bytes
    assert plans["nf4"].parts["weights"] == plans["dense"].parts["weights"] - d_bytes + q_bytes
    assert plans["nf4"].parts["adapters"] == plans["dense"].parts["adapters"]  # the same LoRA tree
    ga = nf4.lora_ga_exact()
    targets = model.lora_targets(nf4_cfg.lora)
    assert ga.fits and ga.parts["accumulators"] == 4 * sum(
        math.prod(flat_ds[t.path + ("kernel",)].shard_shape(flat_d[t.path + ("kernel",)].shape)) for t in targets)
    assert ga.parts["weights"] == plans["nf4"].parts["weights"]
    report = plan_lib.PlanReport(tgt, "tiny", model.config.num_params, dict(mesh.shape), "none", 32, tgt.hbm_bytes,
                                 plans["nf4"], None, base=command_lib.base_description(nf4_cfg))
    assert "base nf4 (double quant)" in report.format()


def test_plan_batch_carries_what_the_loader_adds():
    """A packed run's batches carry positions, model.logits_at_targets' also target positions (planned at their
    widest): the plan compiles the step with them, each one (rows, T) int32 array more in its arguments."""
    tgt = plan_lib.resolve_target("cpu8")
    mesh = make_mesh(MeshConfig(data=2, fsdp=4), plan_lib.target_devices(tgt))
    plain = tiny_config(micro_batch_size=8)
    packed = dataclasses.replace(plain, data=dataclasses.replace(plain.data, packing=True))
    both = dataclasses.replace(packed, model=dataclasses.replace(packed.model, logits_at_targets=True))
    plans = [plan_lib.Planner(c, mesh, None, tgt.hbm_bytes, TINY).train(1) for c in (plain, packed, both)]
    per_chip = 8 * 32 * 4 // 8  # one (8, 32) int32 array over the 8 chips
    assert all(p.fits for p in plans)
    assert plans[1].memory.argument == plans[0].memory.argument + per_chip
    assert plans[2].memory.argument == plans[1].memory.argument + per_chip


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


def test_gpu_target_names(monkeypatch):
    """One host's GPUs: N devices, each with XLA's pool (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75) of its memory."""
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    h = plan_lib.resolve_target("h100x8")
    assert (h.platform, h.chip, h.topology, h.num_devices) == ("cuda", "h100", "1x1x8", 8)
    assert h.hbm_bytes == int(0.75 * h.total_bytes) and "0.75 of" in h.describe()
    a = plan_lib.resolve_target("a100-40gb")
    assert a.num_devices == 1 and a.total_bytes == 40 * plan_lib.GiB
    assert plan_lib.resolve_target("h100-80gbx2").chip == "h100"
    for bad in ("h100x9", "h100x0"):
        with pytest.raises(plan_lib.PlanError, match="1 to 8 GPUs"):
            plan_lib.resolve_target(bad)
    with pytest.raises(plan_lib.PlanError, match="one host"):
        plan_lib.resolve_target("h100x8", num_slices=2)


def test_gpu_plan_compiles_for_a_described_gpu_without_one(monkeypatch):
    """The CUDA PJRT plugin compiles for a GPU it is only told about (no GPU, driver or CUDA libraries): the same
    train step, per-GPU memory against XLA's pool. Without the plugin the target says what to install."""
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    if not plan_lib.cuda_plugin_installed():
        with pytest.raises(plan_lib.PlanError, match="cuda12-local"):
            plan_lib.target_devices(plan_lib.resolve_target("h100x4"))
        pytest.skip(f"CUDA PJRT plugin not installed ({plan_lib.CUDA_PIP}): GPU compilation not tested")
    r = plan_lib.plan(tiny_config(), "h100x4", hf_config=TINY, micro_batch=1, max_micro_batch=2, lora_ga_steps=False)
    assert r.target.platform == "cuda" and r.mesh == {"data": 4, "fsdp": 1, "tensor": 1}
    assert r.train.fits and r.train.peak > r.train.parts["weights"] > 0 and r.train.memory.temp > 0
    assert r.largest.per_chip == 2 and r.largest.memory.temp > r.train.memory.temp
    assert r.hbm_bytes == int(0.75 * plan_lib.GPUS["h100"][-1])


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
    # (a request that does not fit is searched below it anyway: capped at 1/chip here, one compile)
    big = plan_lib.plan(tiny_config(), "v5e-4", hf_config=TINY, micro_batch=2 ** 20, search=False,
                        lora_ga_steps=False, max_micro_batch=1)
    assert not big.train.fits and big.train.memory is None and big.train.over_bytes > 0
    assert big.largest.per_chip == 1 and big.largest.fits


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
