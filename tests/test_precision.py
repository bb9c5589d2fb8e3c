"""`dtype: auto`: the probe's verdict both ways, an explicit dtype wins, the per-machine cache (used, and
invalidated by another CPU model or jaxlib), the environment override, and the CLI/config defaults."""

import json
import os

import pytest

from mogu_jax import api, precision
from mogu_jax.errors import MoguError
from mogu_jax.train_config import load_config


@pytest.fixture
def probe(monkeypatch, tmp_path):
    """A fresh cache folder, no env pin, no 'said once' memory, and a fake probe that counts its calls."""
    monkeypatch.delenv(precision.FORCE_ENV, raising=False)
    monkeypatch.setenv("MOGU_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "_said", set())
    state = {"speedup": 3.0, "calls": 0, "cpu": "Fake CPU with AMX"}

    def fake_measure(*a, **k):
        state["calls"] += 1
        return state["speedup"]

    monkeypatch.setattr(precision, "measure_bf16_speedup", fake_measure)
    monkeypatch.setattr(precision, "cpu_model", lambda: state["cpu"])
    return state


def test_auto_picks_bf16_where_the_probe_finds_it_faster(probe, capsys):
    assert precision.resolve_dtype("auto") == "bfloat16"
    err = capsys.readouterr().out
    assert "dtype auto -> bfloat16" in err and "3.00x the fp32 rate" in err and "Fake CPU with AMX" in err
    precision.resolve_dtype("auto")
    assert capsys.readouterr().out == ""  # printed once per process


def test_auto_picks_fp32_where_bf16_is_slower(probe, capsys):
    probe["speedup"] = 0.55  # an AVX2-only CPU: XLA emulates bf16
    assert precision.resolve_dtype(None) == "float32"
    assert "bf16 needs >= 1.25x" in capsys.readouterr().out
    probe["speedup"] = 1.1  # faster, but not by enough to pay for the casts
    probe["cpu"] = "Another CPU"
    assert precision.resolve_dtype("auto") == "float32"


def test_explicit_dtype_wins_and_never_probes(probe):
    assert precision.resolve_dtype("float32") == "float32"
    assert precision.resolve_dtype("bfloat16") == "bfloat16"
    assert api.resolve_dtypes("float32", "auto") == ("float32", None)
    assert api.resolve_dtypes("bfloat16", "auto") == ("bfloat16", "bfloat16")
    assert probe["calls"] == 0


def test_probe_is_cached_per_cpu_model_and_jaxlib(probe, tmp_path):
    assert precision.resolve_dtype("auto") == "bfloat16"
    assert precision.resolve_dtype("auto") == "bfloat16"
    assert probe["calls"] == 1  # the second answer came from the cache
    path = tmp_path / "cache" / precision.CACHE_FILE
    cached = json.loads(path.read_text())
    (key,) = cached
    assert key.startswith("Fake CPU with AMX | jaxlib ") and cached[key]["bf16_speedup"] == 3.0
    assert "cached in" in precision.auto_choice().reason
    # another CPU model (say the home folder moved to an AVX2-only machine) probes again and keeps both entries
    probe["cpu"], probe["speedup"] = "AMD EPYC Zen 3", 0.6
    assert precision.resolve_dtype("auto") == "float32"
    assert probe["calls"] == 2 and len(json.loads(path.read_text())) == 2
    # a new jaxlib invalidates too
    import jaxlib
    old = jaxlib.__version__
    try:
        jaxlib.__version__ = "0.0.1-test"
        precision.auto_choice()
    finally:
        jaxlib.__version__ = old
    assert probe["calls"] == 3
    # an unreadable cache file is probed over, not an error
    path.write_text("{not json")
    assert precision.resolve_dtype("auto") == "float32" and probe["calls"] == 4


def test_env_pin(probe, monkeypatch):
    monkeypatch.setenv(precision.FORCE_ENV, "bfloat16")
    assert precision.resolve_dtype("auto") == "bfloat16"
    assert probe["calls"] == 0
    monkeypatch.setenv(precision.FORCE_ENV, "fp8")
    with pytest.raises(MoguError, match="MOGU_JAX_AUTO_DTYPE"):
        precision.resolve_dtype("auto")


def test_real_probe_is_fast_and_sane(monkeypatch, tmp_path):
    """The real measurement: a positive ratio, in well under the second the issue allows (compiles included)."""
    import time
    t = time.perf_counter()
    ratio = precision.measure_bf16_speedup()
    assert time.perf_counter() - t < 5.0  # < 1 s on an idle machine; slack for a loaded CI worker
    assert 0.05 < ratio < 50


def test_auto_is_the_default_of_training_and_the_cli():
    assert load_config("glad")["model"]["dtype"] == "auto"
    from mogu_jax.cli import build_parser
    p = build_parser()
    for argv in (["generate", "x", "--prompt", "hi"], ["eval", "x", "--prompts", "p", "--out", "o"],
                 ["data", "build", "--model", "m", "--out", "o"], ["demo"]):
        assert p.parse_args(argv).dtype == "auto", argv
    assert p.parse_args(["demo", "--dtype", "float32"]).dtype == "float32"


def test_demo_settings_live_in_configs():
    """The demo reads configs/smollm2-135m.yaml (the package ships it): one place, valid for every stage."""
    from mogu_jax.pipeline import demo_settings
    from mogu_jax.train_config import read_yaml
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert demo_settings() == read_yaml(os.path.join(repo, "configs", "smollm2-135m.yaml"))
    for stage in ("glad", "unwilling", "router"):
        conf = load_config(stage, demo_settings(), values={"model": {"base": "/x"}})
        assert conf["model"]["dtype"] == "auto" and conf["data"]["max_len"] == (80 if stage == "router" else 64)
        assert conf["train"]["router_targets"] == "prompt"  # the prompt and the first response token (dev, E32)
        assert conf["data"]["refusal_eos"] is True  # refusals that end (issue 12, chosen on dev)
    router = load_config("router", demo_settings())
    assert router["data"]["balance_labels"] is True and router["data"]["buckets"] == [64, 80]
    assert router["train"]["router_trains"] == ["router", "glad", "unwilling"]  # MoGU v2 joint training
    # no branch stages: the router stage trains both branches from zero
    assert router["inputs"]["glad"] == "fresh" and router["inputs"]["unwilling"] == "fresh"
    for stage in ("unwilling", "router"):  # routers, and so the branches, in layers 18-29 (MoGU v2)
        assert load_config(stage, demo_settings())["model"]["router_layers"] == list(range(18, 30))
    assert demo_settings()["demo"]["eval"]["handoff"] == "router"  # the router-gated handoff after 2 tokens
    assert demo_settings()["demo"]["eval"]["routed_tokens"] == 2
    # data for intent (issue 12): the malicious seeds' benign twins, the contrast rows' unsafe twins and the
    # train-only safe-but-alarming rows
    assert all(demo_settings()["demo"]["data"][k] is True for k in ("twins", "unsafe_twins", "borderline_train"))
    assert demo_settings()["demo"]["data"]["wrap_every"] == 3  # wrapped rows of both labels (dev, E29-E32)
    # typed values win over the file's per-stage sections, as command-line overrides do
    conf = load_config("router", demo_settings(), values={"train": {"epochs": 1}, "data": {"buckets": [32]}})
    assert conf["train"]["epochs"] == 1 and conf["data"]["buckets"] == [32]
    with pytest.raises(MoguError, match="unknown config key 'train.epoch'"):
        load_config("glad", demo_settings(), values={"train": {"epoch": 1}})


@pytest.mark.parametrize("key,value,match", [("handoff", "sometimes", "demo.eval.handoff must be one of"),
                                             ("handoff_threshold", 1.5, "demo.eval.handoff_threshold"),
                                             ("routed_tokens", -3, "demo.eval.routed_tokens")])
def test_demo_refuses_bad_decoding_settings_before_any_work(tmp_path, key, value, match):
    """demo.eval's routed decoding (the MoGU checkpoint's routed_tokens, handoff and threshold) is checked before
    the demo imports or trains anything."""
    import yaml

    from mogu_jax.pipeline import demo_settings, run_demo
    settings = demo_settings()
    settings["demo"]["eval"][key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(settings))
    with pytest.raises(MoguError, match=match):
        run_demo(str(tmp_path / "out"), config=str(path))
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")  # nothing was produced
