"""Every ```bash block of README.md, run or parsed, so that the documentation cannot drift from the code.

**Run**, in order, with tiny random models in a temporary working folder: every ``mogu-jax`` command except
``demo``. Placeholders (HF_DIR, CKPT, OUT_DIR, PEFT_DIR, ...; ``/models/llama2`` and ``smollm2`` too) become
tiny-model paths made here, and a few options are appended to keep each run short (see RULES: fewer new tokens,
2 training updates on a 128-token bucket, 4 seed rows per list). Optional parts ``[...]`` are left out of the run.
The ``train router`` line is stopped after its first update (as if interrupted), so that the README's
``--resume`` line, configured by that run's own ``config.yaml``, continues it to the end.

**Parsed** by the real parser: every form of every ``mogu-jax`` command (each ``[...]`` included, each
``a|b`` alternative in turn), so an option the README shows and the parser lacks fails here.

**Parsed only**: ``mogu-jax demo`` (even ``--quick`` takes ~1.6 min; tests/test_demo.py runs it), the ``pip
install`` lines (their options must exist in pip, the project must have the ``test`` extra, the pinned torch is
the one installed) and ``python -m pytest`` (its options need pytest-xdist, the ``tests`` folder must exist).

A README command that no rule covers fails the test: add a rule when you add a command.
"""

import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from mogu_jax import api
from mogu_jax.checkpoint import save_checkpoint
from mogu_jax.cli import main, parse_args
from mogu_jax.config import ModelConfig
from mogu_jax.convert.hf import params_from_source
from mogu_jax.convert.mogu_artifacts import AUTHOR_CHECKPOINTS
from mogu_jax.convert.sources import HFDirSource
from mogu_jax.errors import MoguError
from mogu_jax.train_config import load_config
from test_mogu import random_mogu
from tiny_models import save_hf

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TRAIN_FAST = ["train.max_steps=2", "checkpoint.every=1", "data.max_len=128", "data.buckets=[128]"]


# --------------------------------------------------------------------------------------------- README -> commands

def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)


def commands(block: str) -> list[list[str]]:
    """Shell words of each command of a block: continuation lines joined, comments dropped, ``&&`` chains
    split."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        cmd: list[str] = []
        for w in words + ["&&"]:
            if w == "&&":
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return out


def forms(words: list[str]) -> tuple[list[str], list[list[str]]]:
    """(the command without its optional ``[...]`` parts, every full form: each ``[...]`` included and each
    ``a|b|c`` value replaced by one alternative, in turn)."""
    minimal, full, group = [], [], None
    for w in words:
        if group is None and w.startswith("["):
            group, w = [], w[1:]
        if group is not None:
            closes = w.endswith("]")
            group.append(w[:-1] if closes else w)
            if closes:
                full += group
                group = None
            continue
        minimal.append(w)
        full.append(w)
    assert group is None, f"unclosed [ in README command: {' '.join(words)}"
    n_alts = max([len(w.split("|")) for w in full] + [1])
    variants = [[w.split("|")[i % len(w.split("|"))] if "|" in w else w for w in full] for i in range(n_alts)]
    return minimal, variants


def readme_commands() -> list[list[str]]:
    return [c for b in bash_blocks(README.read_text(encoding="utf-8")) for c in commands(b)]


def test_readme_has_the_commands_this_test_covers():
    cmds = readme_commands()
    assert len(cmds) >= 20, cmds   # the blocks were found (a README restyle must not silently skip them all)
    assert sum(c[0] == "mogu-jax" for c in cmds) >= 15


# --------------------------------------------------------------------------------------------- parsed only

def _parses(words: list[str]) -> None:
    try:
        parse_args(words)
    except SystemExit as e:   # argparse: unknown option, missing value, bad choice
        raise AssertionError(f"README command does not parse: mogu-jax {' '.join(words)}") from e


@pytest.mark.parametrize("words", [c for c in readme_commands() if c[0] == "mogu-jax"],
                         ids=lambda c: " ".join(c)[:60])
def test_every_mogu_jax_form_parses(words):
    minimal, variants = forms(words[1:])
    _parses(minimal)
    for v in variants:
        _parses(v)


def _pip_options() -> str:
    return subprocess.run([sys.executable, "-m", "pip", "install", "--help"], capture_output=True, text=True,
                          check=True).stdout


def check_pip(words: list[str], pip_help: str) -> None:
    assert words[:2] == ["pip", "install"], words
    for w in words[2:]:
        if w.startswith("-"):
            assert re.search(rf"(^|[\s,]){re.escape(w)}[\s,=]", pip_help, re.M), f"pip install has no option {w}"
        elif w.startswith("."):
            assert (ROOT / "pyproject.toml").is_file()
            extra = re.fullmatch(r"\.(?:\[([\w,]+)\])?", w)
            assert extra, w
            pyproject = (ROOT / "pyproject.toml").read_text()
            for name in (extra.group(1) or "").split(","):
                if name:
                    assert re.search(rf"^{name}\s*=", pyproject, re.M), f"pyproject has no extra {name!r} ({w})"
        elif "==" in w:
            name, version = w.split("==")
            assert importlib.metadata.version(name).split("+")[0] == version, f"{w}: installed is not that version"


def check_pytest(words: list[str]) -> None:
    assert words[:3] == ["python", "-m", "pytest"], words
    if "-n" in words:
        assert importlib.util.find_spec("xdist") is not None, "pytest -n needs pytest-xdist"
    for w in words[3:]:
        if not w.startswith("-") and not w.isdigit():
            assert (ROOT / w).exists(), f"pytest target {w} does not exist"


def check_script(words: list[str]) -> None:
    """``python scripts/X.py --opt ...``: the script exists and its --help names every option the README uses."""
    script = ROOT / words[1]
    assert script.is_file(), f"README runs {words[1]}, which does not exist"
    shown = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=ROOT,
                           timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    for w in words[2:]:
        if w.startswith("--"):
            assert w.split("=")[0] in shown.stdout, f"{words[1]} has no option {w}"


def test_install_and_test_lines():
    pip_help = _pip_options()
    seen = set()
    for words in readme_commands():
        if words[0] == "pip":
            check_pip(words, pip_help)
        elif words[:2] == ["python", "-m"]:
            check_pytest(words)
        elif words[0] == "python" and words[1].startswith("scripts/"):
            check_script(words)
        elif words[0] == "mogu-jax":
            continue
        else:
            raise AssertionError(f"README command {' '.join(words)!r}: no rule in this test (add one)")
        seen.add(words[0])
    assert seen == {"pip", "python"}


# --------------------------------------------------------------------------------------------- run

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny HF model, a tiny MoGU checkpoint, its published artifacts and the released folder layout."""
    root = tmp_path_factory.mktemp("readme")
    hf = str(root / "hf")
    save_hf("llama_gqa", hf)
    src = HFDirSource(hf)
    cfg = ModelConfig.from_hf(src.hf_config())
    base = jax.tree_util.tree_map(np.asarray, params_from_source(src, cfg))
    mogu = str(root / "mogu")
    save_checkpoint(mogu, cfg, jax.tree_util.tree_map(np.asarray, random_mogu(cfg, base, router_std=1.0)),
                    src.hf_config(), tokenizer=src.tokenizer())
    export = root / "export"
    api.convert_jax_to_mogu(mogu, str(export))
    released = root / "released"
    steps = AUTHOR_CHECKPOINTS["llama2"]
    shutil.copytree(export / "glad", released / "resp_glad" / f"{steps['glad']}_lora")
    shutil.copytree(export / "unwilling", released / "resp_unwill" / f"{steps['unwilling']}_lora")
    (released / "router_layer").mkdir()
    shutil.copy(export / "router.pth", released / "router_layer" / f"{steps['router']}_router.pth")
    return {"root": root, "hf": hf, "mogu": mogu, "export": export, "released": str(released)}


def _write_work_folder(w: Path) -> None:
    """The working folder of the run: configs/ (the repository's), the published data files the llama2 config
    names (tiny), prompt files."""
    shutil.copytree(ROOT / "configs", w / "configs")
    (w / "data").mkdir()
    pairs = [{"instruction": f"w{5 + i} w{6 + i}", "output": f"w{9 + i} w{10 + i} w{11 + i}"} for i in range(16)]
    for name in ("unsafety_affirm", "unsafety_reject", "safety_affirm", "safety_reject", "data_normal"):
        (w / "data" / f"{name}.json").write_text(json.dumps(pairs))
    (w / "data" / "data_label.json").write_text(json.dumps([i % 2 for i in range(16)]))
    (w / "in.jsonl").write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n"
                                        for i, p in enumerate(["w5 w6", "w7 w8 w9"])))
    (w / "file.csv").write_text("prompt,label\nw5 w6,unsafe\nw7 w8,safe\n")


def _rules(t: dict, w: Path) -> dict:
    """Per command (its first words): placeholder -> value (a list: one per occurrence, the last repeated),
    and the options appended to keep it short."""
    gen_fast = ["--max-new-tokens", "4"]
    return {
        ("convert", "hf-to-jax"): ({"HF_DIR": t["hf"], "OUT_DIR": str(w / "ours")}, []),
        ("convert", "jax-to-hf"): ({"CKPT_DIR": str(w / "ours"), "OUT_DIR": str(w / "hf_back")}, []),
        ("generate",): ({"CKPT": [t["hf"], t["hf"], t["mogu"]], "IN.jsonl": str(w / "in.jsonl"),
                         "OUT.jsonl": [str(w / "gen1.jsonl"), str(w / "gen1.jsonl"), str(w / "gen2.jsonl")],
                         "text": "w5 w6"}, gen_fast),
        ("convert", "mogu-to-jax"): ({"OUT_DIR": [str(w / "m1"), str(w / "m2")], "HF_DIR": t["hf"],
                                      "--glad PEFT_DIR": str(t["export"] / "glad"),
                                      "--unwilling PEFT_DIR": str(t["export"] / "unwilling"),
                                      "ROUTER.pth": str(t["export"] / "router.pth"),
                                      "MOGU_PARAM_DIR": t["released"]}, []),
        ("convert", "jax-to-mogu"): ({"CKPT_DIR": str(w / "m1"), "OUT_DIR": str(w / "export2")}, []),
        ("train",): ({"model.base=/models/llama2": f"model.base={t['hf']}"}, TRAIN_FAST),
        ("data", "build"): ({"smollm2": t["hf"]}, ["--limit", "4", "--max-new-tokens", "8"]),
        ("eval",): ({"CKPT": t["mogu"], "FILE.csv": str(w / "file.csv")}, gen_fast),
    }


def substitute(words: list[str], rules: dict, seen: dict) -> list[str]:
    key = next((k for k in rules if tuple(words[:len(k)]) == k), None)
    if key is None:
        raise AssertionError(f"README command `mogu-jax {' '.join(words)}`: no rule in this test (add one)")
    mapping, extra = rules[key]
    n = seen[key] = seen.get(key, -1) + 1

    def value(v):
        return v[min(n, len(v) - 1)] if isinstance(v, list) else v

    out = []
    for i, w in enumerate(words):
        pair = f"{words[i - 1]} {w}" if i else ""
        if pair in mapping:
            out.append(value(mapping[pair]))
        elif w in mapping:
            out.append(value(mapping[w]))
        else:
            out.append(w)
    if "--resume" in words:   # the resumed run keeps the settings of its own config.yaml
        extra = []
    return out + extra


def _interrupted_after_first_update(monkeypatch):
    """`train router` stops after one update (checkpointed), as if interrupted, for the --resume line."""
    import mogu_jax.trainer as trainer
    real = trainer.run_stage

    def first_update_only(conf, resume=False, **kw):
        if conf["stage"] == "router" and not resume:
            return real(conf, resume=resume, stop_after=1, **kw)
        return real(conf, resume=resume, **kw)

    monkeypatch.setattr(trainer, "run_stage", first_update_only)


def parsed_only(words: list[str]) -> bool:
    """README commands this test parses (test_every_mogu_jax_form_parses) but does not run, each run by its own
    test: the demo (the embedded model; tests/test_demo.py), `plan` (a 7B compile for a TPU slice, minutes;
    tests/test_plan.py), `probe` (tests/test_probe.py), and commands on the demo's own data
    (configs/smollm2-135m.yaml) or the 585-prompt independent set (tests/test_seeds.py loads it)."""
    return words[1] in ("demo", "plan", "probe") or any("smollm2-135m.yaml" in w or "independent_test" in w
                                                       for w in words)


def test_every_readme_command_runs(tiny, tmp_path, monkeypatch, capsys):
    w = tmp_path / "work"
    w.mkdir()
    _write_work_folder(w)
    monkeypatch.chdir(w)
    _interrupted_after_first_update(monkeypatch)
    rules, seen, ran = _rules(tiny, w), {}, []
    for words in readme_commands():
        if words[0] != "mogu-jax" or parsed_only(words):
            continue
        argv = substitute(forms(words[1:])[0], rules, seen)
        code = main(argv)
        captured = capsys.readouterr()
        assert code == 0, f"README command failed: mogu-jax {' '.join(argv)}\n{captured.err[-3000:]}"
        ran.append(" ".join(words[1:3]))
    assert len(ran) >= 15
    # what the commands made, in the working folder
    assert (w / "ours" / "mogu.json").is_file() and (w / "hf_back" / "config.json").is_file()
    assert len((w / "gen1.jsonl").read_text().splitlines()) == 2 and (w / "gen2.jsonl").is_file()
    assert (w / "m1" / "router").is_dir() and (w / "m2" / "router").is_dir()
    assert (w / "export2" / "router.pth").is_file()
    runs = w / "runs" / "llama2-7b-chat"
    for stage in ("glad", "unwilling", "router"):
        assert (runs / stage / "DONE").is_file(), stage
    router_updates = [json.loads(x)["update"] for x in (runs / "router" / "metrics.jsonl").read_text().splitlines()]
    assert router_updates == [1, 2]   # the interrupted update 1, then the resumed update 2
    assert (w / "runs" / "data" / "test.jsonl").is_file() and (w / "runs" / "data" / "dev.jsonl").is_file()
    assert json.loads((w / "runs" / "report" / "report.json").read_text())["n_rows"] >= 1
    assert json.loads((w / "runs" / "report-file" / "report.json").read_text())["kinds"] == ["harmful", "benign"]


# --------------------------------------------------------------------------------------------- the train parser

def test_train_overrides_anywhere():
    args = parse_args(["train", "glad", "a.x=1", "--config", "c1.yaml", "b.y=2", "--resume", "--config", "c2.yaml",
                       "c.z=3"])
    assert (args.stage, args.config, args.resume) == ("glad", ["c1.yaml", "c2.yaml"], True)
    assert args.overrides == ["a.x=1", "b.y=2", "c.z=3"]
    with pytest.raises(MoguError, match="unrecognized arguments: --bogus"):  # one error line, exit 2 (cli.main)
        parse_args(["train", "glad", "--config", "c.yaml", "--bogus"])
    with pytest.raises(MoguError, match="unrecognized arguments: a=1"):   # overrides are train's and plan's only
        parse_args(["eval", "ckpt", "--prompts", "p", "--out", "o", "a=1"])


def test_resolved_config_is_a_config(tmp_path):
    conf = load_config("glad", [str(ROOT / "configs/llama2-7b-chat.yaml"), str(ROOT / "configs/mesh/fsdp8.yaml")],
                       ["model.base=/m", "optim.lr=1e-4"])
    resolved = tmp_path / "config.yaml"
    resolved.write_text(yaml.safe_dump(conf, sort_keys=False))
    again = load_config("glad", [str(resolved)])
    # the same run again (the command-line lr too, which won over per_stage.glad's); per_stage, already applied,
    # is not read again
    assert again["optim"]["lr"] == 1e-4 and conf["per_stage"]["glad"]["optim"]["lr"] == 5e-5
    assert {k: v for k, v in again.items() if k != "per_stage"} == {k: v for k, v in conf.items() if k != "per_stage"}
    assert load_config("glad", [str(resolved)], ["train.seed=3"])["train"]["seed"] == 3
    with pytest.raises(MoguError, match=r"resolved config of a 'glad' run .*not `train router`"):
        load_config("router", [str(resolved)])
