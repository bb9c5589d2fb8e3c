"""`mogu-jax eval` end to end on a tiny MoGU checkpoint, and its bad input."""

import json
import os

import jax
import numpy as np
import pytest

from mogu_jax.checkpoint import save_checkpoint
from mogu_jax.cli import main
from mogu_jax.config import ModelConfig
from mogu_jax.convert.hf import params_from_source
from mogu_jax.convert.sources import HFDirSource
from test_mogu import random_mogu
from tiny_models import save_hf, cli_fails


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    save_hf("llama_gqa", str(root / "hf"))
    src = HFDirSource(str(root / "hf"))
    cfg = ModelConfig.from_hf(src.hf_config())
    base = params_from_source(src, cfg)
    p = random_mogu(cfg, jax.tree_util.tree_map(np.asarray, base), router_std=1.0)
    save_checkpoint(str(root / "mogu"), cfg, jax.tree_util.tree_map(np.asarray, p), src.hf_config(),
                    tokenizer=src.tokenizer())
    return root




def test_eval_writes_report(ckpts, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    rows = [("w5 w6", "harmful"), ("w7 w8 w9", "jailbreak"), ("w10", "benign"), ("w11 w12", "borderline")]
    prompts.write_text("".join(json.dumps({"prompt": p, "kind": k}) + "\n" for p, k in rows))
    out = tmp_path / "report"
    assert main(["eval", str(ckpts / "mogu"), "--prompts", str(prompts), "--out", str(out),
                 "--max-new-tokens", "8", "--routed-tokens", "3"]) == 0
    report = json.load(open(out / "report.json"))
    assert report["settings"]["routed_tokens"] == 3
    assert set(report["metrics"]["mogu"]) == {"harmful", "jailbreak", "benign", "borderline"}
    assert len(report["router"]["layer_a"]["harmful"]) == 2  # per layer, per kind
    assert os.path.isfile(out / "refusal_rates.png") and os.path.isfile(out / "router_layers.png")
    assert report["settings"]["handoff"] == "fixed" and report["settings"]["handoff_threshold"] is None
    # the router-gated handoff and its threshold, from the command line
    out2 = tmp_path / "gated"
    assert main(["eval", str(ckpts / "mogu"), "--prompts", str(prompts), "--out", str(out2), "--max-new-tokens", "8",
                 "--routed-tokens", "3", "--handoff", "router", "--handoff-threshold", "0.3"]) == 0
    settings = json.load(open(out2 / "report.json"))["settings"]
    assert settings["handoff"] == "router" and settings["handoff_threshold"] == 0.3
    cli_fails(capsys, ["eval", str(ckpts / "mogu"), "--prompts", str(prompts), "--out", str(tmp_path / "x"),
                       "--handoff", "sometimes"], "--handoff")
    cli_fails(capsys, ["eval", str(ckpts / "mogu"), "--prompts", str(prompts), "--out", str(tmp_path / "x"),
                       "--handoff", "router", "--handoff-threshold", "2"], "--handoff-threshold")


def test_eval_bad_input(ckpts, tmp_path, capsys):
    out = str(tmp_path / "out")
    ck = str(ckpts / "mogu")
    nofield = tmp_path / "a.jsonl"
    nofield.write_text('{"text": "w5", "kind": "harmful"}\n')
    cli_fails(capsys, ["eval", ck, "--prompts", str(nofield), "--out", out], "prompt")
    badkind = tmp_path / "b.jsonl"
    badkind.write_text('{"prompt": "w5", "kind": "spicy"}\n')
    cli_fails(capsys, ["eval", ck, "--prompts", str(badkind), "--out", out], "spicy")
    empty = tmp_path / "c.jsonl"
    empty.write_text("")
    cli_fails(capsys, ["eval", ck, "--prompts", str(empty), "--out", out], "empty")
    csv = tmp_path / "d.csv"
    csv.write_text("question,answer\nw5,w6\n")
    cli_fails(capsys, ["eval", ck, "--prompts", str(csv), "--out", out], "question")
    good = tmp_path / "e.jsonl"
    good.write_text('{"prompt": "w5", "kind": "harmful"}\n')
    cli_fails(capsys, ["eval", str(ckpts / "hf"), "--prompts", str(good), "--out", out], "MoGU")
    assert not os.path.exists(out)


def test_eval_prompts_by_column(ckpts, tmp_path, capsys):
    table = tmp_path / "bench.csv"
    table.write_text("prompt,label\nw5 w6,unsafe\nw7 w8,safe\nw9,safe\n")
    out = tmp_path / "report"
    assert main(["eval", str(ckpts / "mogu"), "--prompts", str(table), "--prompt-column", "prompt",
                 "--kind-column", "label", "--kind-map", "safe=benign,unsafe=harmful", "--out", str(out),
                 "--max-new-tokens", "4"]) == 0
    report = json.load(open(out / "report.json"))
    assert report["kinds"] == ["harmful", "benign"] and report["metrics"]["mogu"]["benign"]["n"] == 2
    assert report["usability"]["systems"]["mogu"]["benign"]["n"] == 2
    lines = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
    assert [(r["id"], r["prompt"], r["kind"]) for r in lines] == [
        ("bench-1", "w5 w6", "harmful"), ("bench-2", "w7 w8", "benign"), ("bench-3", "w9", "benign")]
    assert "ROUGE-L vs base" in capsys.readouterr().out


def test_eval_by_column_bad_input(ckpts, tmp_path, capsys):
    out = str(tmp_path / "out")
    ck = str(ckpts / "mogu")
    table = tmp_path / "t.csv"
    table.write_text("prompt,label\nw5,unsafe\nw6,spicy\n")
    base = ["eval", ck, "--prompts", str(table), "--out", out]
    cli_fails(capsys, base + ["--prompt-column", "question", "--kind", "harmful"], "missing column(s) question")
    cli_fails(capsys, base + ["--prompt-column", "prompt", "--kind-column", "category"], "missing column(s) category")
    cli_fails(capsys, base + ["--prompt-column", "prompt", "--kind-column", "label", "--kind-map", "unsafe=harmful"],
              "unknown kind value 'spicy'", "row 2")
    cli_fails(capsys, base + ["--prompt-column", "prompt", "--kind-column", "label", "--kind-map", "unsafe"],
              "'unsafe' is not value=kind")
    cli_fails(capsys, base + ["--prompt-column", "prompt", "--kind-column", "label", "--kind-map", "unsafe=bad"],
              "unknown kind 'bad'")
    cli_fails(capsys, base + ["--prompt-column", "prompt"], "--kind-column", "--kind")
    cli_fails(capsys, base + ["--prompt-column", "prompt", "--kind-map", "a=benign"], "--kind-map needs --kind-column")
    cli_fails(capsys, base + ["--kind-column", "label"], "go with --prompt-column")
    assert not os.path.exists(out)
