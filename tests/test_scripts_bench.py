"""The benchmark scripts run end to end in their tiny `--quick` form and write well-formed outputs.

scripts/bench_throughput.py: jaxlora vs PEFT LoRA training throughput (two worker subprocesses, alternating blocks).
scripts/convergence.py: LoRA vs LoRA-GA vs full fine-tuning curves, table and plot.
scripts/bench_quant.py: QLoRA (nf4 / int8) vs bf16 / fp32 bases: weight bytes, RSS, tokens/s, losses (nf4 here).
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
    assert set(res["summary"]) == {"lora", "lora_ga", "full"} == set(res["runs"]) == set(res["grid"])
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
    assert "| method |" in text and "| LoRA-GA |" in text and "| full fine-tuning |" in text and "load average" in text
    # --render redraws the same table and a plot from the JSON alone
    _run(["scripts/convergence.py", "--render", str(js), "--out-dir", str(tmp_path / "again")])
    assert (tmp_path / "again" / "convergence.md").read_text() == text
    assert (tmp_path / "again" / "convergence.png").stat().st_size > 1000


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
