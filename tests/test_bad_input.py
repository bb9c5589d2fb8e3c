"""Bad input: one clear error line, exit code 2, and nothing half-written."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mogu_jax.cli import main
from tiny_models import save_hf, cli_fails


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("good") / "hf"
    save_hf("llama_gqa", str(d))
    return str(d)




def _nothing_written(parent, out_name):
    assert not os.path.exists(os.path.join(parent, out_name))
    assert not [n for n in os.listdir(parent) if n.startswith(f".{out_name}.")], "temp folder left behind"


def _copy(hf_dir, tmp_path):
    d = str(tmp_path / "src")
    shutil.copytree(hf_dir, d)
    return d


def test_missing_config(capsys, hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    os.remove(os.path.join(d, "config.json"))
    cli_fails(capsys, ["convert", "hf-to-jax", d, str(tmp_path / "out")], "missing config.json")
    _nothing_written(str(tmp_path), "out")


def test_missing_weights(capsys, hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    os.remove(os.path.join(d, "model.safetensors"))
    cli_fails(capsys, ["convert", "hf-to-jax", d, str(tmp_path / "out")], "no weights")
    _nothing_written(str(tmp_path), "out")


def test_unsupported_model_type_lists_supported(capsys, hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["model_type"] = "gpt2"
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    line = cli_fails(capsys, ["convert", "hf-to-jax", d, str(tmp_path / "out")], "gpt2")
    for t in ("llama", "mistral", "qwen2"):
        assert t in line
    _nothing_written(str(tmp_path), "out")


def test_missing_tensor_is_named(capsys, hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    path = os.path.join(d, "model.safetensors")
    sd = load_file(path)
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, path, metadata={"format": "pt"})
    cli_fails(capsys, ["convert", "hf-to-jax", d, str(tmp_path / "out")], "model.layers.1.mlp.up_proj.weight",
           "missing")
    _nothing_written(str(tmp_path), "out")


def test_wrong_shape_is_named(capsys, hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    path = os.path.join(d, "model.safetensors")
    sd = load_file(path)
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(sd, path, metadata={"format": "pt"})
    cli_fails(capsys, ["convert", "hf-to-jax", d, str(tmp_path / "out")], "model.layers.0.self_attn.k_proj.weight",
           "[16, 64]", "[32, 64]")
    _nothing_written(str(tmp_path), "out")


def test_corrupt_safetensors(capsys, hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    path = os.path.join(d, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    cli_fails(capsys, ["convert", "hf-to-jax", d, str(tmp_path / "out")], "corrupt safetensors")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"{not json")
    cli_fails(capsys, ["convert", "hf-to-jax", d, str(tmp_path / "out")], "corrupt safetensors")
    _nothing_written(str(tmp_path), "out")


def test_existing_different_output_refused(capsys, hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    cli_fails(capsys, ["convert", "hf-to-jax", hf_dir, str(out)], "--overwrite")
    assert (out / "notes.txt").read_text() == "keep me"


def test_not_a_checkpoint_for_export(capsys, hf_dir, tmp_path):
    cli_fails(capsys, ["convert", "jax-to-hf", hf_dir, str(tmp_path / "out")], "not a mogu_jax checkpoint")
    _nothing_written(str(tmp_path), "out")


def test_failure_mid_export_leaves_nothing(capsys, hf_dir, tmp_path, monkeypatch):
    assert main(["convert", "hf-to-jax", hf_dir, str(tmp_path / "ck")]) == 0
    import mogu_jax.convert.hf as hfmod
    real = hfmod.write_safetensors
    calls = []

    def flaky(path, specs, produce, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(path, specs, produce, metadata)

    monkeypatch.setattr(hfmod, "write_safetensors", flaky)
    with pytest.raises(OSError):
        main(["convert", "jax-to-hf", str(tmp_path / "ck"), str(tmp_path / "out"), "--max-shard-size", "0.00002"])
    assert len(calls) == 2
    _nothing_written(str(tmp_path), "out")


def test_checkpoint_with_mis_shaped_params(capsys, hf_dir, tmp_path):
    ck = str(tmp_path / "ck")
    assert main(["convert", "hf-to-jax", hf_dir, ck]) == 0
    meta_path = os.path.join(ck, "mogu.json")
    meta = json.load(open(meta_path))
    meta["model_config"]["intermediate_size"] = 128
    json.dump(meta, open(meta_path, "w"))
    cli_fails(capsys, ["convert", "jax-to-hf", ck, str(tmp_path / "out")], "mlp", "[2, 96, 64]", "[2, 128, 64]")
    _nothing_written(str(tmp_path), "out")


def test_prompts_file_errors(capsys, hf_dir, tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"id": 1, "prompt": "w5 w6"}\n{"id": 2}\n')
    cli_fails(capsys, ["generate", hf_dir, "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl")],
           "p.jsonl: row 2", "prompt")
    assert not os.path.exists(tmp_path / "o.jsonl")
