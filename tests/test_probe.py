"""`mogu-jax probe`: hidden states against transformers, the probe finds a planted layer, the command's outputs,
`model.router_layers=top-K:PROBE_DIR` in the trainer's config, and bad input."""

import json
import os

import numpy as np
import pytest
import torch

from mogu_jax import probe as P
from mogu_jax.cli import main
from mogu_jax.train_config import load_config
from tiny_models import cli_fails, make_hf_model, save_hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import random
    root = tmp_path_factory.mktemp("probe")
    hf = str(root / "hf")
    save_hf("llama_gqa", hf)
    r = random.Random(0)
    with open(root / "router.jsonl", "w") as f:
        for i in range(40):
            lab = i % 2
            words = " ".join(f"w{r.randrange(4, 120)}" for _ in range(r.randrange(2, 12)))
            f.write(json.dumps({"instruction": ("w50 w51 " if lab else "w60 w61 ") + words, "output": "w10",
                                "label": lab}) + "\n")
    return {"root": root, "hf": hf, "router": str(root / "router.jsonl")}


def test_last_token_states_equal_hf_hidden_states(tiny):
    """Every layer's output at the last prompt token, batched with right padding and length buckets, equals
    transformers' hidden states of each prompt run alone (the last layer before HF's final norm)."""
    from mogu_jax import api
    from mogu_jax.templates import encode_prompt, format_prompt

    cfg, params, tok = api.load(tiny["hf"])
    prompts = ["w5 w6 w7", "w8 " * 20, "w9", "w10 w11 w12 w13 w14"]
    ours = P.last_token_states(cfg, params, tok, prompts, batch_size=3)
    assert ours.shape == (4, cfg.num_layers, cfg.hidden_size)
    hf = make_hf_model("llama_gqa")
    captured = []
    hook = hf.model.layers[-1].register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, tuple)
                                                                                     else o))
    for n, p in enumerate(prompts):
        ids = torch.tensor([encode_prompt(tok, format_prompt(tok, p))])
        with torch.no_grad():
            out = hf(ids, output_hidden_states=True)
        ref = [h[0, -1].numpy() for h in out.hidden_states[1:-1]] + [captured[-1][0, -1].numpy()]
        np.testing.assert_allclose(ours[n], np.stack(ref), atol=1e-4, err_msg=p)
    hook.remove()


def test_probe_finds_the_planted_layer():
    """Labels planted (noisily) in one layer's features: that layer ranks first, near-perfect on held-out rows,
    the others near chance; the chosen layers are the top-k of the probe's own ranking."""
    rng = np.random.default_rng(0)
    n, layers, d = 160, 5, 24
    y = np.arange(n) % 2
    x = rng.normal(size=(n, layers, d)).astype(np.float32)
    x[:, 3, 7] += 3.0 * (2 * y - 1)
    fit, held = P.split_rows(y, 0.25, 0)
    assert len(held) == 40 and not set(fit) & set(held)
    assert y[held].sum() == 20  # stratified
    s = P.fit_probes(x[fit], y[fit], x[held], y[held])
    assert all(0.0 <= a <= 1.0 for a in s["accuracy"])
    ranking = P.rank_layers(s["accuracy"], s["loss"])
    assert ranking[0] == 3 and s["accuracy"][3] >= 0.95
    assert s["eval_logits"].shape == (layers, len(held))  # the accuracy is theirs, thresholded at 0
    np.testing.assert_allclose((s["eval_logits"] > 0).astype(float).__eq__(y[held][None]).mean(1), s["accuracy"])
    assert max(s["accuracy"][i] for i in range(layers) if i != 3) < 0.8
    assert P.top_layers(ranking, 2) == sorted(ranking[:2])
    # averaged over splits: one split is the plain probe; several still find the layer
    one = P.repeated_scores(x, y, 0.25, 0, 1)
    np.testing.assert_array_equal(one["accuracy"], s["accuracy"])
    assert float(one["accuracy_std"].max()) == 0.0
    three = P.repeated_scores(x, y, 0.25, 0, 3)
    assert P.rank_layers(three["accuracy"], three["loss"])[0] == 3 and float(three["accuracy_std"].max()) > 0
    # ties in accuracy are broken by the held-out loss, then the layer id
    assert P.rank_layers([1.0, 1.0, 0.5], [0.3, 0.1, 0.0]) == [1, 0, 2]
    assert P.rank_layers([0.5, 0.5], [0.2, 0.2]) == [0, 1]


def test_probe_rows_from_each_source(tiny, tmp_path):
    from mogu_jax import synth
    seeds = P.load_rows("seeds")
    assert sum(r["label"] for r in seeds) == len(synth.split("malicious", "train"))
    assert len(seeds) == len(synth.split("benign", "train")) + len(synth.split("malicious", "train"))
    both = P.load_rows("seeds+contrast")
    assert len(both) == len(seeds) + len(synth.split("contrast", "train"))
    assert sum(r["label"] for r in both) == sum(r["label"] for r in seeds)
    assert [r["label"] for r in P.load_rows(tiny["router"])][:4] == [0, 1, 0, 1]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "router.jsonl").write_text(open(tiny["router"]).read())
    assert len(P.load_rows(str(tmp_path / "data"))) == 40
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i}", "kind": k}) + "\n"
                               for i, k in enumerate(["harmful", "jailbreak", "benign", "borderline"])))
    assert [r["label"] for r in P.load_rows(str(prompts))] == [1, 1, 0, 0]


def test_probe_command_outputs_and_trainer_config(tiny, tmp_path, capsys):
    out = str(tmp_path / "probe")
    assert main(["probe", tiny["hf"], "--data", tiny["router"], "--out", out, "--top-k", "1"]) == 0
    printed = capsys.readouterr().out
    doc = json.load(open(os.path.join(out, "probe.json")))
    assert open(os.path.join(out, "accuracy.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert [r["layer"] for r in doc["layers"]] == [0, 1]
    assert all(0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["fit_accuracy"] <= 1.0 for r in doc["layers"])
    assert doc["n_fit"] + doc["n_heldout"] == 40 and doc["n_heldout"] == 10
    acc = [r["accuracy"] for r in doc["layers"]]
    assert doc["ranking"] == P.rank_layers(acc, [r["loss"] for r in doc["layers"]])
    assert doc["router_layers"] == [doc["ranking"][0]] and acc[doc["ranking"][0]] == max(acc)
    assert f"router_layers: {doc['ranking'][0]}" in printed
    # the trainer takes the probe's choice
    conf = load_config("router", None, [f"model.router_layers=top-1:{out}"])
    assert conf["model"]["router_layers"] == doc["router_layers"]
    conf = load_config("router", None, [f"model.router_layers=top-2:{out}/probe.json"])
    assert conf["model"]["router_layers"] == [0, 1]
    assert load_config("router", None, ["model.router_layers=5,3"])["model"]["router_layers"] == [3, 5]
    assert load_config("router", None, ["model.router_layers=[1]"])["model"]["router_layers"] == [1]
    assert load_config("router", None, [])["model"]["router_layers"] is None


def test_probe_bad_input(tiny, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = ["probe", tiny["hf"], "--out", out]
    cli_fails(capsys, argv + ["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl", "does not exist")
    one_class = tmp_path / "one.jsonl"
    one_class.write_text("".join(json.dumps({"prompt": f"w{i}", "kind": "harmful"}) + "\n" for i in range(6)))
    cli_fails(capsys, argv + ["--data", str(one_class)], "2 benign rows")
    bad_kind = tmp_path / "kind.jsonl"
    bad_kind.write_text(json.dumps({"prompt": "w5", "kind": "evil"}) + "\n")
    cli_fails(capsys, argv + ["--data", str(bad_kind)], "kind.jsonl", "unknown kind")
    cli_fails(capsys, argv + ["--data", tiny["router"], "--holdout", "1.5"], "--holdout")
    cli_fails(capsys, argv + ["--data", tiny["router"], "--repeats", "0"], "--repeats")
    cli_fails(capsys, argv + ["--data", tiny["router"], "--top-k", "3"], "--top-k", "2 layers")
    assert not os.path.exists(out)
    os.makedirs(out)
    open(os.path.join(out, "other"), "w").close()
    cli_fails(capsys, argv + ["--data", tiny["router"]], "--overwrite")
    # the trainer's config: a probe folder that is not there, or more layers than the probe has
    with pytest.raises(Exception, match="no probe file"):
        load_config("router", None, [f"model.router_layers=top-2:{tmp_path / 'nope'}"])
    cli_fails(capsys, ["train", "router", "model.router_layers=top-x:y"], "model.router_layers")
    cli_fails(capsys, ["train", "router", "model.router_layers=[1,1]"], "distinct")


def _probe_ceiling():
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "probe_ceiling.py")
    spec = importlib.util.spec_from_file_location("probe_ceiling", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_probe_ceiling_script_reads_other_features_and_fit_rows(tiny, tmp_path, capsys):
    """scripts/probe_ceiling.py: its features are the probe's hidden states (framed prompts; after the base
    model's greedy answer tokens, the state at the last answer token of prompt + answer); extra fit rows are
    counted; bad input is one error line and exit 2."""
    from argparse import Namespace

    from mogu_jax import api
    from mogu_jax.generate import generate_ids
    from mogu_jax.templates import encode_prompt, format_prompt

    pc = _probe_ceiling()
    cfg, params, tok = api.load(tiny["hf"], dtype="float32", param_dtype="float32")
    prompts = ["w5 w6 w7", "w8 " * 9, "w9"]
    plain = Namespace(frame="{prompt}", answer_tokens=0, batch_size=4)
    np.testing.assert_allclose(pc.features(cfg, params, tok, prompts, plain),
                               P.last_token_states(cfg, params, tok, prompts, batch_size=4), atol=1e-5)
    framed = pc.features(cfg, params, tok, prompts, Namespace(**{**vars(plain), "frame": "w3 {prompt} w4"}))
    np.testing.assert_allclose(framed, P.last_token_states(cfg, params, tok, [f"w3 {p} w4" for p in prompts]),
                               atol=1e-5)
    after = pc.features(cfg, params, tok, prompts, Namespace(**{**vars(plain), "answer_tokens": 3}))
    ids = [encode_prompt(tok, format_prompt(tok, p)) for p in prompts]
    answers = generate_ids(cfg, params, ids, mode="base", max_new_tokens=3, batch_size=4, eos_ids=(-1,))
    assert all(len(a["ids"]) == 3 for a in answers)
    for n, (x, a) in enumerate(zip(ids, answers)):  # each row alone, unpadded: the state at its last token
        alone = P.last_token_states_ids(cfg, params, [x + a["ids"]], batch_size=1)[0]
        np.testing.assert_allclose(after[n], alone, atol=1e-4)
        assert not np.allclose(after[n], P.last_token_states_ids(cfg, params, [x], batch_size=1)[0], atol=1e-3)

    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps({"prompt": ("w50 w51 " if i % 2 else "w60 w61 ") + f"w{i + 20}",
                                         "kind": "harmful" if i % 2 else "benign"}) + "\n" for i in range(12)))
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps([{"instruction": "w50 w51 w99"}, {"prompt": "w50 w51 w98"}]))
    argv = ["--model", tiny["hf"], "--data", tiny["router"], "--eval", str(evals), "--from-layer", "0",
            "--mean-layers", "0-1", "--fit-fraction", "0.5", "--fit-draws", "2", "--extra-fit", f"{extra}=1",
            "--show-misses", "mean"]
    assert pc.main(argv) == 0
    out = capsys.readouterr().out
    assert "fit rows: 42 (22 malicious), 0.5 of them in each of 2 draws" in out
    assert "layer 0 " in out and "layer 1 " in out and "mean 0-1" in out and "must-refuse prompts under" in out
    for bad, needle in [(f"{tmp_path / 'missing.json'}=1", "missing.json"), (f"{extra}=2", "FILE=LABEL")]:
        assert pc.main(argv[:-4] + ["--extra-fit", bad]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
        assert len(err) == 1 and needle in err[0], err
