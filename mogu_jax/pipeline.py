"""End-to-end pieces built from the library: evaluation of base vs MoGU, and the demo on the embedded
SmolLM2-135M-Instruct (import -> data build -> glad -> unwilling -> router -> evaluation -> export)."""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Optional

import numpy as np

from mogu_jax.errors import MoguError


# -------------------------------------------------------------------------------------- evaluation
def run_eval(cfg, params, tok, rows: list[dict], out_dir: str, *, template=None, routed_tokens=None,
             max_new_tokens: int = 96, batch_size: int = 16, overwrite: bool = False, progress: bool = True,
             judge=None) -> dict:
    """Generate with the base model and with MoGU (routed decoding, handoff after ``routed_tokens``; None:
    the config's default; then ``cfg.handoff``) side by side, judge, and write the report. Returns the report."""
    from mogu_jax import evaluate as E
    from mogu_jax import generate as G
    from mogu_jax.gated import gated_answers
    from mogu_jax.io_utils import check_output_dir

    check_output_dir(out_dir, overwrite)
    mode, m = G.decoding_mode(cfg, params, None, routed_tokens, False, max_new_tokens)
    if mode != "routed":
        raise MoguError("evaluation compares base vs MoGU: the checkpoint needs glad, unwilling and router parts")
    encoded = G.encode_instructions(tok, [r["prompt"] for r in rows], template)
    eos = G.text_eos(cfg, tok)
    common = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress, eos_ids=eos)
    base_ids = G.generate_ids(cfg, params, encoded, mode="base", **common)
    if m and cfg.handoff == "router":  # rows handed off to the base model reuse its answers
        mogu_ids = gated_answers(cfg, params, encoded, base_ids, routed_tokens=m, **common)
    else:
        mogu_ids = G.generate_ids(cfg, params, encoded, mode="routed", routed_tokens=m, **common)
    base = [G.decode_row(tok, r, eos) for r in base_ids]
    mogu = [G.decode_row(tok, r, eos) for r in mogu_ids]
    responses = {"base": [o["response"] for o in base], "mogu": [o["response"] for o in mogu]}
    n_layers = len(cfg.router_layer_ids)
    layer_a = np.stack([o["router"]["a"].mean(axis=0) if len(o["router"]["a"]) else np.full(n_layers, np.nan)
                        for o in mogu])
    layer_b = np.stack([o["router"]["b"].mean(axis=0) if len(o["router"]["b"]) else np.full(n_layers, np.nan)
                        for o in mogu])
    ok = ~np.isnan(layer_a).any(axis=1)
    layer_a[~ok] = 0.5  # a row that stopped at once has no routed token: neutral, and counted in the report
    layer_b[~ok] = 0.5
    router = {"layer_a": layer_a.tolist(), "layer_b": layer_b.tolist()}
    report = E.evaluate_responses(rows, responses, router=router, judge=judge)
    report["settings"] = {"routed_tokens": "all" if m is None else m,
                          "handoff": None if m is None else cfg.handoff,
                          "handoff_threshold": cfg.handoff_threshold if cfg.handoff == "router" else None,
                          "max_new_tokens": max_new_tokens,
                          "template": template, "rows_without_routed_tokens": int((~ok).sum())}
    E.write_report(report, rows, responses, out_dir, router=router, overwrite=overwrite)
    return report


# -------------------------------------------------------------------------------------------- demo
DEMO_CONFIG = "demo_config.yaml"  # the package's copy of configs/smollm2-135m.yaml (a link in the source tree)


def demo_settings(path: Optional[str] = None) -> dict:
    """The demo's settings: ``configs/smollm2-135m.yaml`` (shipped in the package), or another file."""
    from importlib import resources

    from mogu_jax.train_config import read_yaml

    if path is None:
        with resources.as_file(resources.files("mogu_jax").joinpath(DEMO_CONFIG)) as p:
            return read_yaml(str(p))
    return read_yaml(path)


def run_demo(out: str, quick: bool = False, overwrite: bool = False, max_new_tokens: Optional[int] = None,
             dtype: str = "auto", config: Optional[str] = None, eval_split: str = "test") -> dict:
    """The main job: MoGU on the embedded SmolLM2-135M-Instruct, end to end, with progress throughout.
    ``config``: a YAML in the layout of configs/smollm2-135m.yaml (default: that file); ``dtype`` overrides
    its ``model.dtype`` unless ``auto``. The evaluation runs on the seed lists' ``eval_split``: ``test``
    (reported) or ``dev`` (for choosing settings)."""
    from mogu_jax import api, synth
    from mogu_jax import evaluate as E
    from mogu_jax import generate as G
    from mogu_jax.flops import Ledger
    from mogu_jax.train_config import FRESH, load_config
    from mogu_jax.trainer import run_stage

    if eval_split not in synth.EVAL_SPLITS:
        raise MoguError(f"unknown evaluation split {eval_split!r}; splits: {', '.join(synth.EVAL_SPLITS)}")
    t0 = time.perf_counter()
    out = _fresh_dir(os.path.abspath(out), overwrite)
    settings = demo_settings(config)
    # the demo section and the model's dtypes as the schema resolves them (one validation of the whole file)
    probe = load_config("glad", settings, values={"model": {"dtype": dtype}} if dtype != "auto" else None)
    dtype, weights = api.resolve_dtypes(probe["model"]["dtype"], probe["model"]["param_dtype"])
    demo = probe["demo"]
    decoding = _decoding(demo["eval"])  # checked before any work
    gen = dict(demo["quick"] if quick else {}, **({"max_new_tokens": max_new_tokens} if max_new_tokens else {}))
    timings, ledger = {}, Ledger()

    def step(name):
        print(f"\n==> {name}", flush=True)
        return time.perf_counter()

    t = step("1/6 import the embedded SmolLM2-135M-Instruct (GGUF -> our checkpoint)")
    base_ckpt = os.path.join(out, "smollm2")
    api.convert_hf_to_jax(settings.get("model", {}).get("base") or "smollm2", base_ckpt, progress=True)
    timings["import"] = time.perf_counter() - t

    t = step("2/6 build the stage data from the shipped seed lists (base model answers, refusal bank)")
    cfg, params, tok = api.load(base_ckpt, dtype=dtype, param_dtype=weights)
    gen_flops = G.FLOPS_DONE[0]
    data_dir = os.path.join(out, "data")
    fresh = _fresh_branches(settings)
    summary = synth.build_data(cfg, params, tok, data_dir,
                               max_new_tokens=gen.get("max_new_tokens", demo["data"]["max_new_tokens"]),
                               batch_size=demo["data"]["batch_size"], limit=gen.get("limit"),
                               wrap_every=demo["data"]["wrap_every"], twins=demo["data"]["twins"],
                               borderline_train=demo["data"]["borderline_train"],
                               unsafe_twins=demo["data"]["unsafe_twins"],
                               malicious_train=demo["data"]["malicious_train"],
                               affirmatives="glad" not in fresh,  # no glad stage: its rows are not needed
                               progress=True)
    ledger.add("data", G.FLOPS_DONE[0] - gen_flops)
    del params
    timings["data"] = time.perf_counter() - t

    stage_dirs = {}
    for i, stage in enumerate(("glad", "unwilling", "router"), start=3):
        if stage in fresh:  # inputs.<branch>: fresh: the router stage trains that branch from zero
            print(f"\n==> {i}/6 no {stage} stage: the router stage trains the {stage} branch from zero "
                  f"(inputs.{stage}: fresh)", flush=True)
            stage_dirs[stage] = FRESH
            continue
        t = step(f"{i}/6 train the {stage} stage")
        values = {"model": {"base": base_ckpt, "dtype": dtype, "param_dtype": weights},
                  "data": {stage: {"jsonl": os.path.join(data_dir, stage + ".jsonl")}},
                  "output": {"dir": os.path.join(out, stage)}}
        if quick:
            values["data"].update(max_len=gen["max_len"], buckets=[gen["max_len"]])
            values["train"] = {"epochs": gen["epochs"]}
        if stage == "router":
            values["inputs"] = {"glad": stage_dirs["glad"], "unwilling": stage_dirs["unwilling"]}
        res = run_stage(load_config(stage, settings, values=values), progress=True)
        stage_dirs[stage] = res["out_dir"]
        ledger.add(stage, res["flops"])
        timings[stage] = time.perf_counter() - t

    t = step(f"6/6 evaluate base vs MoGU on the {eval_split} split, export the PyTorch artifacts")
    mogu_ckpt = os.path.join(out, "mogu")
    _assemble(base_ckpt, stage_dirs, mogu_ckpt, decoding)
    export = os.path.join(out, "pytorch")
    api.convert_jax_to_mogu(mogu_ckpt, export)
    cfg, params, tok = api.load(mogu_ckpt, dtype=dtype, param_dtype=weights)
    rows = E.load_prompts(os.path.join(data_dir, synth.EVAL_FILES[eval_split]))
    if quick:
        rows = _take_per_kind(rows, gen["per_kind"])
    report_dir = os.path.join(out, "report")
    gen_flops = G.FLOPS_DONE[0]
    report = run_eval(cfg, params, tok, rows, report_dir, batch_size=demo["eval"]["batch_size"],
                      max_new_tokens=gen.get("max_new_tokens", demo["eval"]["max_new_tokens"]))
    ledger.add("eval", G.FLOPS_DONE[0] - gen_flops)
    timings["eval"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    run = {"quick": quick, "dtype": dtype, "eval_split": eval_split, "prompts": len(rows)}
    _finish(out, report, timings, ledger, summary, run, (report_dir, mogu_ckpt, export))
    return {"report": report, "timings": timings, "out": out, "flops": ledger.phases, **run}


def _fresh_branches(settings: dict) -> set:
    """The branches the router stage starts from zero (``inputs.<branch>: fresh``): their stages are skipped."""
    from mogu_jax.train_config import FRESH, load_config

    return {part for part, src in load_config("router", settings)["inputs"].items() if src == FRESH}


def _fresh_dir(out: str, overwrite: bool) -> str:
    if os.path.exists(out) and os.listdir(out):
        if not overwrite:
            raise MoguError(f"{out} is not empty; pass --overwrite to start the demo again there")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    return out


def _finish(out, report, timings, ledger, summary, run: dict, paths: tuple) -> None:
    from mogu_jax import evaluate as E

    with open(os.path.join(out, "timings.json"), "w") as f:
        json.dump({"timings_s": timings, "flops": ledger.phases, "data": summary, **run}, f, indent=2, default=str)
    report_dir, mogu_ckpt, export = paths
    print(f"\nbase vs MoGU on the {run['eval_split']} split of the seed lists ({run['prompts']} prompts):")
    print(E.format_table(report))
    print(f"\nwall time {timings['total'] / 60:.1f} min "
          f"({', '.join(f'{k} {v:.0f}s' for k, v in timings.items() if k != 'total')}); dtype {run['dtype']}")
    print(ledger.format())
    print(f"report:            {report_dir}/report.md, report.json, refusal_rates.png, router_layers.png")
    print(f"MoGU checkpoint:   {mogu_ckpt}")
    print(f"PyTorch artifacts: {export}/glad, {export}/unwilling (PEFT LoRA), {export}/router.pth")


def _take_per_kind(rows, n):
    seen: dict = {}
    out = []
    for r in rows:
        if seen.get(r["kind"], 0) < n:
            out.append(r)
            seen[r["kind"]] = seen.get(r["kind"], 0) + 1
    return out


def _decoding(settings: dict) -> dict:
    """The MoGU checkpoint's routed decoding from ``demo.eval``: ``routed_tokens`` (-1: every token) and
    ``handoff``."""
    from mogu_jax.config import HANDOFFS

    m, how, gate = settings["routed_tokens"], settings["handoff"], settings["handoff_threshold"]
    if isinstance(m, bool) or not isinstance(m, int) or m < -1:
        raise MoguError(f"demo.eval.routed_tokens must be an integer >= -1 (-1: every token routed), got {m!r}")
    if how not in HANDOFFS:
        raise MoguError(f"demo.eval.handoff must be one of {', '.join(HANDOFFS)}, got {how!r}")
    if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not 0 <= gate <= 1:
        raise MoguError(f"demo.eval.handoff_threshold must be a number in [0, 1], got {gate!r}")
    return {"routed_tokens": m, "handoff": how, "handoff_threshold": float(gate)}


def _assemble(base_ckpt: str, stage_dirs: dict, out_dir: str, decoding: dict) -> None:
    """Our MoGU checkpoint from the base checkpoint and the three stages' trained parts, decoding as ``decoding``
    (:func:`_decoding`) says."""
    import jax

    from mogu_jax.checkpoint import load_checkpoint, load_tokenizer, save_checkpoint
    from mogu_jax.config import ModelConfig
    from mogu_jax.trainer import restore_part

    cfg, base, meta = load_checkpoint(base_ckpt)
    stage_cfg = json.load(open(os.path.join(stage_dirs["router"], "final", "router", "stage.json")))["model_config"]
    cfg = ModelConfig.from_dict(stage_cfg).replace(**decoding, dtype="float32", remat=False)
    parts = {p: restore_part(_final_part(stage_dirs, p), cfg, p) for p in ("glad", "unwilling", "router")}
    parts = jax.tree_util.tree_map(np.asarray, parts)
    save_checkpoint(out_dir, cfg, {"base": base, **parts}, meta["hf_config"], tokenizer=load_tokenizer(base_ckpt),
                    generation_config=meta.get("generation_config"))


def _final_part(stage_dirs: dict, part: str) -> str:
    """Where a trained part is: the router stage's output when it trained the part too (train.router_trains),
    else the part's own stage."""
    joint = os.path.join(stage_dirs["router"], "final", part)
    if os.path.isfile(os.path.join(joint, "stage.json")):
        return joint
    return os.path.join(stage_dirs[part], "final", part)
