"""The benchmark scripts run end to end in their tiny `--quick` form and write well-formed outputs.

scripts/bench_throughput.py: jaxlora vs PEFT LoRA training throughput (two worker subprocesses, alternating blocks).
scripts/convergence.py: LoRA and its inits (and full fine-tuning) under the tuned-rate and shared-rate protocols:
curves, table and plot.
scripts/bench_quant.py: QLoRA (nf4 / int8) vs bf16 / fp32 bases: weight bytes, RSS, tokens/s, losses (nf4 here).
scripts/profile_step.py: one step op by op in both frameworks (XLA's per-op trace, torch.profiler).
Each runs in a subprocess with one CPU device (the suite's 8 simulated devices are stripped from XLA_FLAGS). Numbers
are not checked against targets here (the machine may be shared); only shape, finiteness and internal consistency.
"""

from __future__ import annotations

import json
import sys

import pytest

from scripts_harness import ROOT, finite as _finite, run_script as _run


def test_bench_throughput_quick(tmp_path):
    out_md = tmp_path / "bench.md"
    _run(["scripts/bench_throughput.py", "--quick", "--out-md", str(out_md)])
    res = json.loads(out_md.with_suffix(".json").read_text())
    for name in ("jaxlora", "peft"):
        x = res[name]
        for k in ("tokens_per_s", "real_tokens_per_s", "step_s", "mfu", "peak_rss_mb", "loaded_rss_mb"):
            assert _finite(x[k]) and x[k] > 0, (name, k, x[k])
        assert len(x["tokens_per_s_blocks"]) == res["args"]["blocks"]
        assert len(x["losses"]) == res["args"]["warmup"] + res["args"]["steps"]
        assert all(_finite(v) for v in x["losses"])
        assert x["peak_rss_mb"] >= x["loaded_rss_mb"]
    assert res["jaxlora"]["lora_params"] == res["peft"]["lora_params"]  # the same adapters
    # same model, data and loss: the first step (B = 0, so the base model's loss) agrees across frameworks
    assert abs(res["jaxlora"]["losses"][0] - res["peft"]["losses"][0]) < 1e-3
    assert _finite(res["ratio_jaxlora_over_peft"]) and _finite(res["peak_flops"]) and res["peak_flops"] > 0
    assert len(res["load_start"]) == 3 and len(res["load_end"]) == 3
    md = out_md.read_text()
    assert "| framework | tokens/s |" in md and "load average" in md and "MFU" in md
    assert len([line for line in md.splitlines() if line.startswith("| jaxlora |")]) == 1
    assert "| PEFT + transformers |" in md


def test_bench_quant_quick_streams_each_step(tmp_path):
    """The nf4 variant alone (one compile): a progress line per step as the worker goes, and its result."""
    out = tmp_path / "bench_quant.json"
    proc = _run(["scripts/bench_quant.py", "--quick", "--variants", "nf4", "--steps", "2", "--out", str(out)])
    steps = [line for line in proc.stdout.splitlines() if line.lstrip().startswith("[nf4] step ")]
    assert [s.split()[2] for s in steps] == ["1/2", "2/2"] and "compiled for " in steps[0], proc.stdout
    res = json.loads(out.read_text())
    (r,) = res["results"]
    assert r["variant"] == "nf4" and r["quantization"] == "nf4" and r["finite"] and len(r["losses"]) == 2
    assert 0 < r["quantized_kernel_bytes"] < r["weight_bytes"] and len(r["step_s"]) == 2
    assert r["peak_rss_mb"] > 0 and res["nf4_vs_bf16"] is None and isinstance(res["tokens_per_s_under_load"], bool)


def test_convergence_quick(tmp_path):
    _run(["scripts/convergence.py", "--quick", "--out-dir", str(tmp_path)])
    png, js, md = (tmp_path / f"convergence.{ext}" for ext in ("png", "json", "md"))
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads(js.read_text())
    steps, seeds = res["args"]["steps"], res["args"]["seeds"].split(",")
    methods = {"lora", "lora_ga", "pissa", "olora", "lora_one", "eva", "corda", "full"}
    assert set(res["summary"]) == methods == set(res["runs"]) == set(res["grid"])
    # every init but plain LoRA's is computed once per method (reused by its rates and seeds) and timed
    assert set(res["init_seconds"]) == methods - {"lora", "full"} and all(v > 0 for v in res["init_seconds"].values())
    for m, runs in res["runs"].items():
        assert len(runs) == (res["args"]["full_seeds"] if m == "full" else len(seeds))
        lrs = {r["lr"] for r in runs}
        assert len(lrs) == 1 and res["grid"][m]["chosen"] in lrs
        for r in runs:
            assert len(r["train_losses"]) == steps and all(_finite(v) for v in r["train_losses"])
            assert r["evals"][-1][0] == steps and all(_finite(e[1]) for e in r["evals"])
            assert 0 <= r["accuracy"] <= 1 and len(r["answers"]) == res["n_acc"]
        s = res["summary"][m]
        assert len(s["train_smoothed_mean"]) == steps and s["eval_steps"][0] == 0
        for k in ("final_train", "final_eval", "accuracy"):
            assert _finite(s[k]), (m, k)
        assert s["train_smoothed_min"][-1] <= s["final_train"] <= s["train_smoothed_max"][-1]
    # LoRA reaches its own final (smoothed, seed-mean) loss by its last step at the latest: speed-up 1 against itself
    assert res["summary"]["lora"]["steps_to_lora_final"] is not None
    assert res["summary"]["lora"]["speedup_vs_lora"] == 1.0
    assert _finite(res["base"]["eval_loss"])
    text = md.read_text()
    assert "| method |" in text and "load average" in text
    for label in ("LoRA", "LoRA-GA", "PiSSA", "OLoRA", "LoRA-One", "EVA", "CorDA (ipm)", "full fine-tuning"):
        assert f"| {label} |" in text, label
    # --render redraws the same table and a plot from the JSON alone
    _run(["scripts/convergence.py", "--render", str(js), "--out-dir", str(tmp_path / "again")])
    assert (tmp_path / "again" / "convergence.md").read_text() == text
    assert (tmp_path / "again" / "convergence.png").stat().st_size > 1000


def test_convergence_shared_protocol(tmp_path):
    """The paper's protocol: no grid, every method and seed at the one rate."""
    _run(["scripts/convergence.py", "--quick", "--protocol", "shared", "--shared-lr", "3e-4", "--methods",
          "lora,pissa", "--acc-examples", "0", "--out-dir", str(tmp_path)])
    res = json.loads((tmp_path / "convergence.json").read_text())
    assert set(res["runs"]) == {"lora", "pissa"} and res["n_acc"] == 0
    for m, runs in res["runs"].items():
        assert res["grid"][m] == {"scores": {}, "curves": {}, "chosen": 3e-4}
        assert [r["lr"] for r in runs] == [3e-4, 3e-4] and all(r["accuracy"] is None for r in runs)
    text = (tmp_path / "convergence.md").read_text()
    assert "every method at one shared rate" in text and "GSM8K accuracy" not in text and "| PiSSA | 0.0003 |" in text


def test_scaled_optimizer_equals_the_run_optimizer():
    """The study's rate-in-state optimizer takes the same steps as `optim.make_optimizer` at that rate."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jaxlora.training import optim
    sys.path.insert(0, str(ROOT / "scripts"))
    from convergence import scaled_optimizer
    cfg = optim.OptimConfig(learning_rate=3e-4, schedule="cosine", warmup_steps=2, max_grad_norm=1.0)
    params = {"lora": {"x": {"a": jnp.ones((3, 4)), "b": jnp.zeros((4, 2))}}, "full": {}}
    ref_tx, tx = optim.make_optimizer(cfg, 8)[0], scaled_optimizer(cfg, 8, 3e-4)
    ref_state, state, p_ref, p = ref_tx.init(params), tx.init(params), params, params
    for i in range(6):
        g = jax.tree.map(lambda x: jnp.sin(x + i) * (i + 1), p_ref)
        u_ref, ref_state = ref_tx.update(g, ref_state, p_ref)
        u, state = tx.update(g, state, p)
        p_ref, p = jax.tree.map(jnp.add, p_ref, u_ref), jax.tree.map(jnp.add, p, u)
    for x, y in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-9)
    assert float(jnp.abs(p_ref["lora"]["x"]["b"]).max()) > 1e-4  # it moved


def test_profile_step_quick(tmp_path):
    """Both profilers run on the same packed rows (jaxlora with logits_at_targets), and every op lands in a category;
    the matrix multiplies carry their FLOPs on both sides."""
    out = tmp_path / "profile.json"
    _run(["scripts/profile_step.py", "--quick", "--logits-at-targets", "--json", str(out), "--out",
          str(tmp_path / "profile.md")])
    res = json.loads(out.read_text())
    sys.path.insert(0, str(ROOT / "scripts"))
    from profile_step import CATEGORIES
    for side in ("jaxlora", "peft"):
        assert res[side]["step_s"] > 0 and res[side]["ops"], side
        assert all(r["category"] in CATEGORIES and r["us"] >= 0 for r in res[side]["ops"].values()), side
        gemm = res["categories"][side]["GEMM"]
        assert gemm["ms"] > 0 and gemm["flops"] > 0, (side, gemm)
    text = (tmp_path / "profile.md").read_text()
    assert all(f"| {c} |" in text for c in CATEGORIES) and "logits_at_targets: True" in text


def test_answer_number():
    sys.path.insert(0, str(ROOT / "scripts"))
    from convergence import answer_number
    assert answer_number("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert answer_number("He pays $18.00 in total.") == "18"
    assert answer_number("The answer is 2.5.") == "2.5"
    assert answer_number("#### -3") == "-3"
    assert answer_number("no number") is None


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
