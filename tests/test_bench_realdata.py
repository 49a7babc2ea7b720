"""scripts/bench_realdata.py (`bench_throughput.py --real-data`) end to end in its tiny --quick form: five worker
subprocesses train one pass each; the figures are not checked against targets (the machine may be shared), only
that every variant saw the same labelled tokens and that the frameworks agree on the first loss of the same batch."""

from __future__ import annotations

import json

from scripts_harness import finite, run_script


def test_bench_realdata_quick(tmp_path):
    out = tmp_path / "realdata.json"
    run_script(["scripts/bench_throughput.py", "--real-data", "--quick", "--passes", "1", "--json", str(out)])
    res = json.loads(out.read_text())
    variants = res["args"]["variants"]
    assert len(variants) == 5
    labelled = res["prep"]["labelled_tokens"]
    assert len(set(labelled.values())) == 1 and labelled[variants[0]] > 0  # the same examples, the same targets
    for name in variants:
        x = res[name]
        assert finite(x["labelled_tokens_per_s"]) and x["labelled_tokens_per_s"] > 0, name
        assert finite(x["peak_rss_mb"]) and x["peak_rss_mb"] > 0 and len(x["passes_s"]) == 1
    computed = res["prep"]["computed_tokens"]
    assert computed["jaxlora_packed"] < computed["jaxlora_bucketed"]  # packing computes fewer tokens
    assert computed["peft_padding_free"] <= computed["peft_padded"]
    first = {name: res[name]["first_loss"] for name in variants}  # B = 0 at init: the base model's loss
    # the same batch of examples, padded (jaxlora's buckets, PEFT's longest) or flattened: the same loss
    assert abs(first["jaxlora_bucketed"] - first["peft_padded"]) < 1e-4, first
    assert abs(first["peft_padding_free"] - first["peft_padded"]) < 1e-4, first
    assert abs(first["jaxlora_packed"] - first["peft_packed"]) < 1e-4, first  # the same packed rows
    assert res["best_peft"] in variants
