"""Hostile input for every subcommand and every option that takes a path, a number or a file: each must give
exactly one ``mogu-jax: error:`` line naming the input, exit 2, no traceback, no warning noise, and nothing
written that looks complete. The CLI runs in-process on a tiny model."""

import json
import logging
import math
import os
import warnings

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mogu_jax.cli import main
from tiny_models import save_hf


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    hf = str(root / "hf")
    save_hf("llama_gqa", hf)
    ck = str(root / "ck")
    assert main(["convert", "hf-to-jax", hf, ck]) == 0
    files = {
        "empty": b"",
        "blank": b"  \n\n",
        "binary": bytes(range(256)) * 8,
        "nul": b"\x00" * 64,
        "nonutf8": b'{"id": 1, "prompt": "w5 \xff\xfe w6"}\n',
        "notjson": b"{this is not json\n",
        "latin1": "caf\xe9 w5".encode("latin-1"),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "prompts.jsonl").write_text('{"id": 1, "prompt": "w5 w6"}\n')
    (root / "adir").mkdir()
    (root / "badmeta").mkdir()
    (root / "badmeta" / "mogu.json").write_bytes(bytes(range(256)))
    return {"root": str(root), "hf": hf, "ck": ck, "prompts": str(root / "prompts.jsonl")}


def _run(argv, capsys, caplog):
    """Run the CLI; -> (exit code, stderr lines, warnings raised, log records at WARNING or above)."""
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        caplog.clear()
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's --help and friends; never expected here
            code = e.code
    err = capsys.readouterr().err
    return code, [ln for ln in err.splitlines() if ln.strip()], caught, list(caplog.records)


def _assert_one_line(argv, capsys, caplog, *needles):
    code, lines, caught, records = _run(argv, capsys, caplog)
    shown = "\n".join(lines)
    assert code == 2, f"{argv}: exit {code}\n{shown}"
    assert "Traceback" not in shown, shown
    assert len(lines) == 1 and lines[0].startswith("mogu-jax: error: "), f"{argv}:\n{shown}"
    for n in needles:
        assert n in lines[0], f"{n!r} not named in: {lines[0]}"
    noise = [str(w.message) for w in caught if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not noise, noise
    assert not [r.getMessage() for r in records], [r.getMessage() for r in records]
    return lines[0]


def _nothing_written(parent, before):
    """No new entry in ``parent`` (no output, no temp file or folder left behind)."""
    assert sorted(os.listdir(parent)) == before, sorted(set(os.listdir(parent)) - set(before))


# --------------------------------------------------------------------------------- hostile input files
# (name of the hostile value, how to make the path from the world, what the error line must contain)
def _file_values(w):
    r = w["root"]
    return {
        "missing": (os.path.join(r, "nope.jsonl"), "nope.jsonl"),
        "empty string": ("", ""),
        "empty file": (os.path.join(r, "empty"), "empty"),
        "blank file": (os.path.join(r, "blank"), "blank"),
        "binary": (os.path.join(r, "binary"), "binary"),
        "NUL bytes": (os.path.join(r, "nul"), "nul"),
        "non-UTF-8": (os.path.join(r, "nonutf8"), "nonutf8"),
        "latin-1": (os.path.join(r, "latin1"), "latin1"),
        "a directory": (os.path.join(r, "adir"), "adir"),
        "over-long name": (os.path.join(r, "p" * 300), "ppp"),
        "relative binary": (os.path.relpath(os.path.join(r, "binary")), "binary"),
    }


FILE_OPTIONS = {
    # subcommand argv with FILE where the hostile file goes, and OUT for a fresh output path
    "generate --prompts": lambda w: ["generate", w["ck"], "--prompts", "FILE", "--out", "OUT/o.jsonl"],
    "eval --prompts": lambda w: ["eval", w["ck"], "--prompts", "FILE", "--out", "OUT/report"],
    "train --config": lambda w: ["train", "glad", "output.dir=OUT/run", "--config", "FILE"],
    "train data.glad.jsonl": lambda w: ["train", "glad", f"model.base={w['hf']}", "data.glad.jsonl=FILE",
                                        "output.dir=OUT/run", "output.tensorboard=false"],
}


@pytest.mark.parametrize("option", sorted(FILE_OPTIONS))
def test_hostile_input_files(world, option, tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.chdir(world["root"])
    for kind, (path, needle) in _file_values(world).items():
        if option == "train data.glad.jsonl" and kind == "NUL bytes":
            continue  # covered by the others; each train case loads the model (slow)
        out = tmp_path / kind.replace(" ", "_")
        out.mkdir()
        argv = [a.replace("FILE", path).replace("OUT", str(out)) for a in FILE_OPTIONS[option](world)]
        if option.startswith("train") and kind not in ("missing", "binary", "a directory", "empty file"):
            continue  # the train reader is the same io_utils reader: a few kinds are enough
        _assert_one_line(argv, capsys, caplog, needle if path else "empty")
        _nothing_written(str(out), [])


# ------------------------------------------------------------------------------ hostile model folders
def _model_values(w):
    r = w["root"]
    return {
        "missing": (os.path.join(r, "nope"), "nope"),
        "empty string": ("", "empty"),
        "empty folder": (os.path.join(r, "adir"), "adir"),
        "a binary file": (os.path.join(r, "binary"), "binary"),
        "a prompts file": (w["prompts"], "prompts.jsonl"),
        "binary mogu.json": (os.path.join(r, "badmeta"), "badmeta"),
        "over-long name": (os.path.join(r, "m" * 300), "mmm"),
    }


MODEL_OPTIONS = {
    "generate CKPT": lambda w: ["generate", "MODEL", "--prompts", w["prompts"], "--out", "OUT/o.jsonl"],
    "eval CKPT": lambda w: ["eval", "MODEL", "--prompts", w["prompts"].replace("prompts", "kinds"),
                            "--out", "OUT/report"],
    "convert hf-to-jax SRC": lambda w: ["convert", "hf-to-jax", "MODEL", "OUT/ck"],
    "convert jax-to-hf CKPT": lambda w: ["convert", "jax-to-hf", "MODEL", "OUT/hf"],
    "convert jax-to-mogu CKPT": lambda w: ["convert", "jax-to-mogu", "MODEL", "OUT/m"],
    "convert mogu-to-jax --base": lambda w: ["convert", "mogu-to-jax", "OUT/m", "--base", "MODEL",
                                             "--router", os.path.join(w["root"], "binary")],
    "data build --model": lambda w: ["data", "build", "--model", "MODEL", "--out", "OUT/data", "--limit", "1"],
    "train model.base": lambda w: ["train", "glad", "model.base=MODEL", f"data.glad.jsonl={w['prompts']}",
                                   "output.dir=OUT/run"],
}


@pytest.mark.parametrize("option", sorted(MODEL_OPTIONS))
def test_hostile_model_folders(world, option, tmp_path, capsys, caplog):
    kinds = os.path.join(world["root"], "kinds.jsonl")
    with open(kinds, "w") as f:
        f.write(json.dumps({"prompt": "w5 w6", "kind": "benign"}) + "\n")
    for kind, (path, needle) in _model_values(world).items():
        out = tmp_path / kind.replace(" ", "_")
        out.mkdir()
        argv = [a.replace("MODEL", path).replace("OUT", str(out)) for a in MODEL_OPTIONS[option](world)]
        if option == "train model.base" and not path:
            needle = "model.base is not set"
        _assert_one_line(argv, capsys, caplog, needle)
        _nothing_written(str(out), [])


# ------------------------------------------------------------------------------------ hostile outputs
OUTPUT_OPTIONS = {
    # argv with OUT where the output path goes; whether it is a file (else a folder)
    "generate --out": (lambda w: ["generate", w["ck"], "--prompts", w["prompts"], "--out", "OUT", "--overwrite",
                                  "--max-new-tokens", "2"], True),
    "generate --router-trace": (lambda w: ["generate", w["ck"], "--prompt", "w5", "--router-trace", "OUT",
                                           "--overwrite", "--max-new-tokens", "2"], True),
    "eval --out": (lambda w: ["eval", w["ck"], "--prompts", os.path.join(w["root"], "kinds.jsonl"), "--out", "OUT"],
                   False),
    "data build --out": (lambda w: ["data", "build", "--model", w["ck"], "--out", "OUT", "--limit", "1"], False),
    "convert hf-to-jax OUT_DIR": (lambda w: ["convert", "hf-to-jax", w["hf"], "OUT"], False),
    "convert jax-to-hf OUT_DIR": (lambda w: ["convert", "jax-to-hf", w["ck"], "OUT"], False),
    "demo --out": (lambda w: ["demo", "--quick", "--out", "OUT"], False),
}


@pytest.mark.parametrize("option", sorted(OUTPUT_OPTIONS))
def test_hostile_output_paths(world, option, tmp_path, capsys, caplog):
    make, is_file = OUTPUT_OPTIONS[option]
    with open(os.path.join(world["root"], "kinds.jsonl"), "w") as f:
        f.write(json.dumps({"prompt": "w5 w6", "kind": "benign"}) + "\n")
    (tmp_path / "afile").write_text("keep me")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    values = {
        "parent is a file": (str(tmp_path / "afile" / "x"), "afile"),
        "over-long name": (str(tmp_path / ("o" * 300)), "ooo"),
        "empty string": ("", "empty"),
    }
    if is_file:
        values["a directory"] = (str(tmp_path / "full"), "full")
    else:
        values["a file"] = (str(tmp_path / "afile"), "afile")
        values["a folder with other files"] = (str(tmp_path / "full"), "full")
    before = sorted(os.listdir(tmp_path))
    for kind, (path, needle) in values.items():
        argv = [a.replace("OUT", path) if a == "OUT" else a for a in make(world)]
        if not is_file:
            argv = [a for a in argv if a != "--overwrite"]
        _assert_one_line(argv, capsys, caplog, needle)
        _nothing_written(str(tmp_path), before)
        assert (tmp_path / "afile").read_text() == "keep me"
        assert (tmp_path / "full" / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------ hostile numbers
# option -> (argv before the value, is the value valid)
NUMBER_OPTIONS = {
    "generate --max-new-tokens": (["generate", "CK", "--prompt", "w5", "--max-new-tokens"], lambda v: _int(v) >= 1),
    "generate --temperature": (["generate", "CK", "--prompt", "w5", "--temperature"], lambda v: _float(v) >= 0),
    "generate --top-p": (["generate", "CK", "--prompt", "w5", "--top-p"], lambda v: 0 < _float(v) <= 1),
    "generate --seed": (["generate", "CK", "--prompt", "w5", "--seed"], lambda v: _int(v) >= 0),
    "generate --batch-size": (["generate", "CK", "--prompt", "w5", "--batch-size"], lambda v: _int(v) >= 1),
    "generate --routed-tokens": (["generate", "CK", "--prompt", "w5", "--routed-tokens"],
                                 lambda v: v.strip().lower() == "all" or _int(v) >= 0),
    "eval --max-new-tokens": (["eval", "CK", "--prompts", "KINDS", "--out", "OUT", "--max-new-tokens"],
                              lambda v: _int(v) >= 1),
    "eval --batch-size": (["eval", "CK", "--prompts", "KINDS", "--out", "OUT", "--batch-size"], lambda v: _int(v) >= 1),
    "data build --max-new-tokens": (["data", "build", "--model", "CK", "--out", "OUT", "--max-new-tokens"],
                                    lambda v: _int(v) >= 1),
    "data build --batch-size": (["data", "build", "--model", "CK", "--out", "OUT", "--batch-size"],
                                lambda v: _int(v) >= 1),
    "data build --limit": (["data", "build", "--model", "CK", "--out", "OUT", "--limit"], lambda v: _int(v) >= 1),
    "data build --seed": (["data", "build", "--model", "CK", "--out", "OUT", "--seed"], lambda v: _int(v) >= 0),
    "convert jax-to-hf --max-shard-size": (["convert", "jax-to-hf", "CK", "OUT", "--max-shard-size"],
                                           lambda v: 0 < _float(v) <= 1e6),
    "convert mogu-to-jax --glad-step": (["convert", "mogu-to-jax", "OUT", "--base", "CK", "--glad-step"],
                                        lambda v: _int(v) >= 0),
    "convert mogu-to-jax --router-layers": (["convert", "mogu-to-jax", "OUT", "--base", "CK", "--router-layers"],
                                            lambda v: False),  # no MoGU inputs given: refused either way
}
TRAIN_NUMBERS = ["optim.lr", "optim.b1", "optim.eps", "optim.warmup_steps", "optim.clip_norm", "train.epochs",
                 "train.max_steps", "train.batch_size", "train.grad_accum", "train.router_lambda",
                 "checkpoint.every", "checkpoint.keep", "model.lora_rank", "data.max_len"]


def _float(v):
    try:
        x = float(v)
    except ValueError:
        return math.nan
    return x if math.isfinite(x) else math.nan


def _int(v):
    try:
        return int(v)
    except ValueError:
        return -10**9


HOSTILE_NUMBERS = ["nan", "NaN", "inf", "-inf", "-1", "0", "-0.0", "1e400", "", "abc", "1.5", "0x10", " ", "1e-400",
                   "9" * 400]
hostile_text = st.one_of(st.sampled_from(HOSTILE_NUMBERS), st.floats().map(repr), st.integers().map(str),
                         st.text(max_size=20))


def _number_argv(world, option, value, out):
    head, _ = NUMBER_OPTIONS[option]
    kinds = os.path.join(world["root"], "kinds.jsonl")
    return [a.replace("CK", world["ck"]).replace("KINDS", kinds).replace("OUT", out) for a in head] + [value]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(option=st.sampled_from(sorted(NUMBER_OPTIONS)), value=hostile_text)
def test_hostile_numbers(world, option, value, tmp_path_factory):
    valid = NUMBER_OPTIONS[option][1]
    assume(not valid(value))
    assume("\x00" not in value)  # argv cannot carry NUL bytes
    with open(os.path.join(world["root"], "kinds.jsonl"), "w") as f:
        f.write(json.dumps({"prompt": "w5 w6", "kind": "benign"}) + "\n")
    out = str(tmp_path_factory.mktemp("num") / "out")
    flag = option.split()[-1]
    line = _run_isolated(_number_argv(world, option, value, out))
    assert flag in line or "router" in line or "mogu" in line, line
    assert not os.path.exists(out)


def _not_a_number(text: str) -> bool:
    import yaml
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return True
    return v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) and math.isnan(_float(text))


# values no numeric training option accepts: non-finite, negative, or not a number at all
bad_training_numbers = st.one_of(
    st.sampled_from(["nan", ".nan", "NaN", "inf", ".inf", "-.inf", "-inf", "1e400", "-1", "abc", "[1]", "{a: 1}",
                     "true", "2001-01-01"]),
    st.floats(max_value=-1e-6, allow_infinity=True).map(repr),
    st.text(min_size=1, max_size=20).filter(lambda t: t.strip() and "=" not in t and "\x00" not in t
                                            and _not_a_number(t)))


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(TRAIN_NUMBERS), value=bad_training_numbers)
def test_hostile_training_numbers(world, key, value, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tn") / "run")
    line = _run_isolated(["train", "glad", "model.base=unused", f"{key}={value}", f"output.dir={out}"])
    assert key in line, line
    assert not os.path.exists(out)


def _run_isolated(argv):
    """_assert_one_line without pytest fixtures (hypothesis re-runs the body many times)."""
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(argv)
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    assert code == 2, (argv, code, lines)
    assert len(lines) == 1 and lines[0].startswith("mogu-jax: error: "), (argv, lines)
    assert not [w for w in caught if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
    return lines[0]
