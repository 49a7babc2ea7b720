"""The LoRA-GA study scripts run end to end on a tiny random Llama (`--quick`) and write well-formed outputs.

scripts/loraga_subspace.py: subspace overlaps of randomized / streaming factorizations with the exact SVD, including
one real `streaming_factorize` run whose subspaces must equal its simulation on the exact gradient.
scripts/bench_loraga.py: LoRA-GA init time and peak memory of jaxlora vs PEFT vs a LoRA step (fresh subprocesses).
Each runs in a subprocess with one CPU device (the suite's 8 simulated devices are stripped from XLA_FLAGS).
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from scripts_harness import finite as _finite, run_script as _run


def test_loraga_subspace_quick(tmp_path):
    out_json, out_md = tmp_path / "sub.json", tmp_path / "sub.md"
    _run(["scripts/loraga_subspace.py", "--quick", "--oversampling", "0,2", "--power", "0,1", "--real", "2:0",
          "--out-json", str(out_json), "--out-md", str(out_md)])
    res = json.loads(out_json.read_text())
    rows = res["rows"]
    kinds = {(r["method"], r["source"].split(" ")[0]) for r in rows}
    assert {("exact", "jnp.linalg.svd"), ("randomized", "factorize_gradient"), ("streaming", "simulated"),
            ("streaming", "real")} <= kinds
    assert len([r for r in rows if r["source"].startswith("simulated")]) == 4  # 2 oversamplings x 2 power
    for r in rows:
        for metric in ("left_2r", "right_2r", "left_r", "right_r", "a_slice", "b_slice"):
            for stat in ("mean", "min"):
                v = r["overlap"][metric][stat]
                assert _finite(v) and -1e-6 <= v <= 1 + 1e-6, (r["method"], metric, stat, v)
        assert r["wall_s"] is not None and _finite(r["wall_s"]) and r["wall_s"] >= 0
        if r["method"] != "exact":
            assert r["passes"] == (1 if r["method"] == "randomized" else 2 + 2 * r["power"])
    exact = rows[0]
    assert exact["method"] == "exact" and all(exact["overlap"][m]["min"] > 0.999 for m in exact["overlap"])
    # streaming through zero-effect LoRA branches == the same algorithm on the materialized gradient
    (check,) = res["real_vs_simulated"]
    assert all(check["overlap_real_vs_simulated"][m]["min"] > 0.99 for m in ("left_2r", "right_2r"))
    # more power iterations never make the mean top-2r overlap worse by much
    sim = {(r["oversampling"], r["power"]): r for r in rows if r["source"].startswith("simulated")}
    for os_ in {k[0] for k in sim}:
        assert sim[(os_, 1)]["overlap"]["left_2r"]["mean"] >= sim[(os_, 0)]["overlap"]["left_2r"]["mean"] - 0.05
    rec = res["recommendation"]
    assert rec and rec["passes"] == 2 + 2 * rec["power"] and rec["q"] == 2 * res["r"] + rec["oversampling"]
    md = out_md.read_text()
    assert "| method | source | oversampling | q | power | passes | wall s | a slice [0:r] | b slice [r:2r]" in md
    assert "Recommended streaming default" in md
    assert len([line for line in md.splitlines() if line.startswith("| ")]) == len(rows) + 1


def test_bench_loraga_quick(tmp_path):
    out_md = tmp_path / "bench.md"
    variants = "jaxlora-exact,peft,jaxlora-streaming,lora-step-r,lora-step-q"
    _run(["scripts/bench_loraga.py", "--quick", "--variants", variants, "--out-md", str(out_md)])
    res = json.loads(out_md.with_suffix(".json").read_text())
    med = res["median"]
    assert set(med) == set(variants.split(","))
    for v, x in med.items():
        for k in ("total_s", "peak_mb", "rss_loaded_mb", "delta_mb"):
            assert _finite(x[k]), (v, k, x[k])
        assert x["total_s"] > 0 and x["peak_mb"] >= x["rss_loaded_mb"] > 0
        assert x["peak_mb"] >= x["peak_after_load_mb"] - 1
    for v in ("jaxlora-exact", "jaxlora-streaming", "peft"):
        assert _finite(med[v]["estimation_s"]) and _finite(med[v]["factorization_s"]), v
    assert med["lora-step-q"]["rank"] == res["q"] and med["lora-step-r"]["rank"] == res["args"]["r"]
    md = out_md.read_text()
    header = next(line for line in md.splitlines() if line.startswith("| variant"))
    for col in ("estimation s", "factorization s", "total s", "PEFT / this", "peak RSS MB", "delta MB",
                "delta / LoRA step r=", "delta / LoRA step q="):
        assert col in header
    assert re.search(r"Machine: \d+ CPUs", md) and "load average" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert len(rows) == len(variants.split(","))
    peft_row = next(r for r in rows if r.startswith("| peft |"))
    assert "| 1.00; 1.00 |" in peft_row  # PEFT / PEFT (median; min)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
