"""HF -> JAX -> HF conversion: bit-exact round trips, sharded and .bin inputs, loadable exports."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from mogu_jax import api
from mogu_jax.checkpoint import read_meta
from mogu_jax.cli import main
from mogu_jax.convert.sources import HFDirSource
from tiny_models import assert_bit_exact, random_tokens, save_hf






@pytest.mark.parametrize("name,dtype", [("llama_gqa", torch.float32), ("qwen2_bias_tied", torch.bfloat16),
                                        ("llama_linear_rope_bias", torch.float16)])
def test_round_trip_bit_exact_and_loadable(tmp_path, name, dtype):
    src = str(tmp_path / "hf")
    hf = save_hf(name, src, dtype=dtype)
    assert main(["convert", "hf-to-jax", src, str(tmp_path / "ck")]) == 0
    meta = read_meta(str(tmp_path / "ck"))
    assert meta["hf_config"]["model_type"] == hf.config.model_type
    assert os.path.isdir(tmp_path / "ck" / "params") and os.path.isdir(tmp_path / "ck" / "tokenizer")
    assert main(["convert", "jax-to-hf", str(tmp_path / "ck"), str(tmp_path / "hf2")]) == 0
    assert_bit_exact(src, str(tmp_path / "hf2"))
    # the export loads in transformers and computes the same logits
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf2"), dtype=torch.float32, attn_implementation="eager").eval()
    tokens = torch.tensor(random_tokens(1, 10), dtype=torch.long)
    with torch.no_grad():
        # (a half-precision HF model also rounds its RoPE buffer, hence a tolerance rather than equality)
        np.testing.assert_allclose(back(tokens).logits.numpy(), hf.float()(tokens).logits.numpy(), atol=1e-3)
    # and the tokenizer went along
    assert os.path.isfile(tmp_path / "hf2" / "tokenizer.json")


def test_sharded_safetensors_in_and_out(tmp_path):
    src = str(tmp_path / "hf")
    save_hf("llama_mha", src, max_shard_size="40KB")
    assert os.path.isfile(os.path.join(src, "model.safetensors.index.json"))
    api.convert_hf_to_jax(src, str(tmp_path / "ck"))
    api.convert_jax_to_hf(str(tmp_path / "ck"), str(tmp_path / "hf2"), max_shard_bytes=40_000)
    idx = json.load(open(tmp_path / "hf2" / "model.safetensors.index.json"))
    assert len(set(idx["weight_map"].values())) > 1
    assert_bit_exact(src, str(tmp_path / "hf2"))
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf2"))


def test_pytorch_bin_input(tmp_path):
    src = str(tmp_path / "hf")
    hf = save_hf("llama_mqa_tied", src, safe_serialization=False)
    assert os.path.isfile(os.path.join(src, "pytorch_model.bin"))
    cfg, params, _ = api.load(src)
    tokens = random_tokens(2, 9)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    ours, _ = api.apply(cfg, params, jnp.asarray(tokens))
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4


def test_reconvert_same_source_is_a_noop_and_different_is_refused(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    save_hf("llama_gqa", a, seed=0)
    save_hf("llama_mha", b, seed=1)
    out = str(tmp_path / "ck")
    assert main(["convert", "hf-to-jax", a, out]) == 0
    stamp = os.path.getmtime(os.path.join(out, "mogu.json"))
    assert main(["convert", "hf-to-jax", a, out]) == 0  # same source: nothing rewritten
    assert os.path.getmtime(os.path.join(out, "mogu.json")) == stamp
    assert main(["convert", "hf-to-jax", b, out]) == 2  # different: refused
    assert read_meta(out)["model_config"]["num_kv_heads"] == 2
    assert main(["convert", "hf-to-jax", b, out, "--overwrite"]) == 0
    assert read_meta(out)["model_config"]["num_kv_heads"] == 4
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], "temp folders left behind"


def test_cast_on_import(tmp_path):
    src = str(tmp_path / "hf")
    save_hf("llama_gqa", src)
    api.convert_hf_to_jax(src, str(tmp_path / "ck"), dtype="bfloat16")
    cfg, params, _ = api.load(str(tmp_path / "ck"))
    assert cfg.param_dtype == "bfloat16"
    assert params["layers"]["attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
