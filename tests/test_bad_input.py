"""Bad input: one clear error line, exit code 2, and nothing half-written."""

import json
import os
import re
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


# ------------------------------------------------------------------ issue 14: the hostile probe's cases
@pytest.fixture(scope="module")
def ckpt(hf_dir, tmp_path_factory):
    ck = str(tmp_path_factory.mktemp("ck14") / "ck")
    assert main(["convert", "hf-to-jax", hf_dir, ck]) == 0
    return ck


def test_relative_checkpoint_prompts_and_out_paths_work(capsys, ckpt, tmp_path, monkeypatch):
    """Orbax resolves relative paths elsewhere: a checkpoint given relative to the working folder loads."""
    shutil.copytree(ckpt, tmp_path / "ck")
    (tmp_path / "p.jsonl").write_text('{"id": "a", "prompt": "w5 w6"}\n')
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "ck", "--prompts", "p.jsonl", "--out", "sub/o.jsonl", "--max-new-tokens", "2"]) == 0
    assert [json.loads(ln)["id"] for ln in open(tmp_path / "sub" / "o.jsonl")] == ["a"]
    assert main(["convert", "jax-to-hf", "ck", "hf_out"]) == 0
    assert os.path.isfile(tmp_path / "hf_out" / "config.json")
    assert "WARNING" not in capsys.readouterr().err


def test_out_folder_refused_before_any_work(capsys, ckpt, tmp_path, monkeypatch):
    import mogu_jax.api as api
    (tmp_path / "p.jsonl").write_text('{"id": 1, "prompt": "w5"}\n')
    (tmp_path / "outdir").mkdir()
    monkeypatch.setattr(api, "load", lambda *a, **k: pytest.fail("the model was loaded before --out was checked"))
    cli_fails(capsys, ["generate", ckpt, "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "outdir"),
                       "--overwrite"], "outdir", "is a directory")
    assert os.listdir(tmp_path / "outdir") == []


@pytest.mark.parametrize("data,needle", [(b'{"id": 1, "prompt": "w5 \xff w6"}\n', "not UTF-8"),
                                         (bytes(range(256)) * 4, "not UTF-8"), (b"\x00" * 32, "binary file")])
def test_undecodable_prompts_and_config(capsys, ckpt, tmp_path, data, needle):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(data)
    cli_fails(capsys, ["generate", ckpt, "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl")], "bad.bin", needle)
    cli_fails(capsys, ["train", "glad", "--config", str(bad)], "bad.bin", needle)
    assert not os.path.exists(tmp_path / "o.jsonl")


def test_prompt_longer_than_the_context(capsys, ckpt, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"id": "short", "prompt": "w5"}) + "\n" +
                 json.dumps({"id": "big", "prompt": " ".join(["w7"] * 3000)}) + "\n")
    out = tmp_path / "o.jsonl"
    line = cli_fails(capsys, ["generate", ckpt, "--prompts", str(p), "--out", str(out), "--max-new-tokens", "6"],
                     "'big'", "--truncate", "256 positions")
    assert not os.path.exists(out)
    n_tokens = int(line.split("has ")[1].split(" tokens")[0])
    assert f"{n_tokens + 6 - 256} more" in line
    for side, kept in (("right", "w7"), ("left", "w7")):
        assert main(["generate", ckpt, "--prompts", str(p), "--out", str(out), "--max-new-tokens", "6",
                     "--truncate", side, "--overwrite"]) == 0
        rows = [json.loads(ln) for ln in open(out)]
        assert [r["id"] for r in rows] == ["short", "big"] and rows[0]["prompt"] == "w5"
        assert rows[1]["prompt"].split()[0] == kept and len(rows[1]["prompt"].split()) < 256


def test_truncate_keeps_the_chosen_end():
    from mogu_jax.cli_inputs import fit_prompts
    from tiny_models import make_tokenizer
    tok = make_tokenizer()
    rows = [{"id": 0, "prompt": " ".join(f"w{10 + i % 100}" for i in range(300))}]
    right = fit_prompts(rows, tok, 64, 8, truncate="right")[0]["prompt"].split()
    left = fit_prompts(rows, tok, 64, 8, truncate="left")[0]["prompt"].split()
    words = rows[0]["prompt"].split()
    assert right == words[:len(right)] and left == words[-len(left):] and 40 < len(right) <= 56


@pytest.mark.parametrize("argv,needle", [
    (["--temperature", "nan"], "--temperature"), (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--batch-size", "-2"], "--batch-size"), (["--routed-tokens", "-1"], "--routed-tokens")])
def test_generate_numbers_refused_when_parsed(capsys, tmp_path, argv, needle):
    cli_fails(capsys, ["generate", str(tmp_path / "never_loaded"), "--prompt", "w5", *argv], needle, "expected")


@pytest.mark.parametrize("size", ["nan", "inf", "0", "-1", "abc"])
def test_max_shard_size_refused(capsys, ckpt, tmp_path, size):
    cli_fails(capsys, ["convert", "jax-to-hf", ckpt, str(tmp_path / "out"), "--max-shard-size", size],
              "--max-shard-size", repr(size))
    _nothing_written(str(tmp_path), "out")


def test_duplicate_prompt_ids_refused(capsys, ckpt, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a", "prompt": "w5"}\n\n{"id": "b", "prompt": "w6"}\n{"id": "a", "prompt": "w7"}\n')
    cli_fails(capsys, ["generate", ckpt, "--prompts", str(p), "--out", str(tmp_path / "o.jsonl")],
              "duplicate id 'a'", "row 3 (line 4)", "first used at row 1")
    assert not os.path.exists(tmp_path / "o.jsonl")


def test_checkpoint_without_mogu_json_named(capsys, ckpt, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(ckpt, d)
    os.remove(d / "mogu.json")
    cli_fails(capsys, ["generate", str(d), "--prompt", "w5"], str(d), "no mogu.json")
    cli_fails(capsys, ["convert", "jax-to-hf", str(d), str(tmp_path / "out")], "no mogu.json")


def test_truncated_params_file_is_one_line(capsys, ckpt, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(ckpt, d)
    files = [os.path.join(dp, f) for dp, _, fs in os.walk(d / "params") for f in fs]
    big = max(files, key=os.path.getsize)
    with open(big, "r+b") as f:
        f.truncate(os.path.getsize(big) // 2)
    # which parameter the cut file held depends on how orbax packed the tensors (layers/... or lm_head/...)
    line = cli_fails(capsys, ["convert", "jax-to-hf", str(d), str(tmp_path / "out")], f"checkpoint {d}",
                     "cannot read parameter ")
    assert re.search(r"cannot read parameter [\w/]+ from params/", line), line
    assert "'driver'" not in line and len(line) < 600
    _nothing_written(str(tmp_path), "out")


def _train_world(tmp_path, hf_dir):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"instruction": "w5 w6 w7", "affirmative": "w10 w11 w12",
                                         "refusal": "w20 w21 w22"}) + "\n" for _ in range(8)))
    return ["train", "glad", f"model.base={hf_dir}", "data.glad.jsonl=pairs.jsonl", "output.dir=run",
            "train.batch_size=8", "output.tensorboard=false", "train.max_steps=1", "mesh.data=1"]


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-1e-3", "abc"])
def test_non_finite_learning_rate_refused_when_parsed(capsys, hf_dir, tmp_path, monkeypatch, value):
    argv = _train_world(tmp_path, hf_dir)
    monkeypatch.chdir(tmp_path)
    cli_fails(capsys, [*argv, f"optim.lr={value}"], "'optim.lr'", "finite number >= 0")
    assert not os.path.exists(tmp_path / "run")


def test_non_finite_parameters_stop_training_before_anything_final(hf_dir, tmp_path, monkeypatch):
    """A NaN learning rate that gets past the parser (a finite loss, NaN parameters after the update) stops the
    run naming the last good checkpoint; nothing final is written. Relative data and output paths."""
    from mogu_jax.errors import MoguError
    from mogu_jax.train_config import load_config
    from mogu_jax.trainer import run_stage
    argv = _train_world(tmp_path, hf_dir)
    monkeypatch.chdir(tmp_path)
    conf = load_config("glad", None, argv[2:])
    conf["optim"]["lr"] = float("nan")
    with pytest.raises(MoguError, match="non-finite values in the params after update 1 of the glad stage.*"
                                        "last good checkpoint is none"):
        run_stage(conf, progress=False)
    for name in ("DONE", "final", "published"):
        assert not os.path.exists(tmp_path / "run" / name), name
    assert not os.listdir(tmp_path / "run" / "checkpoints")
