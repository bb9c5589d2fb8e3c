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
    the config's default) side by side, judge, and write the report. Returns the report."""
    from mogu_jax import evaluate as E
    from mogu_jax.cli import decoding_mode
    from mogu_jax.generate import generate_text
    from mogu_jax.io_utils import check_output_dir

    check_output_dir(out_dir, overwrite)
    mode, m = decoding_mode(cfg, params, None, routed_tokens, False, max_new_tokens)
    if mode != "routed":
        raise MoguError("evaluation compares base vs MoGU: the checkpoint needs glad, unwilling and router parts")
    prompts = [r["prompt"] for r in rows]
    common = dict(template=template, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)
    base = generate_text(cfg, params, tok, prompts, mode="base", **common)
    mogu = generate_text(cfg, params, tok, prompts, mode="routed", routed_tokens=m, **common)
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
    report["settings"] = {"routed_tokens": "all" if m is None else m, "max_new_tokens": max_new_tokens,
                          "template": template, "rows_without_routed_tokens": int((~ok).sum())}
    E.write_report(report, rows, responses, out_dir, router=router, overwrite=overwrite)
    return report


# -------------------------------------------------------------------------------------------- demo
DEMO = {
    # Fitted to <= 10 minutes on 2 CPU cores (issue 5; what was tried is in the README). bf16 compute (bf16 x bf16
    # -> fp32 matmuls, ~4x the fp32 rate on AMX), remat, one length bucket of 80 tokens (a ~42-token prompt with
    # SmolLM2's default system prompt + ~38 response tokens: the first sentences decide refuse vs comply).
    # The reference run's levers: lr 5e-4 for 4/6/9 epochs; here fewer, larger steps, and label-balanced router
    # batches (length grouping had put the short refusals, label 1, into batches of their own). Training runs the
    # template's 24 shared tokens once per batch (train.share_prefix). Measured: 7.8-11.4 min, the same table every run (this machine's speed drifts ~2x).
    "glad": {"optim.lr": 1e-3, "train.epochs": 1, "train.batch_size": 8},
    "unwilling": {"optim.lr": 1e-3, "train.epochs": 2, "train.batch_size": 8},
    "router": {"optim.lr": 3e-3, "optim.schedule": "cosine", "optim.warmup_steps": 4, "train.epochs": 4,
               "train.batch_size": 16, "data.balance_labels": "true"},
}
DEMO_DATA = {"max_new_tokens": 40, "batch_size": 32}  # base-model answers for the stage files
DEMO_TRAIN = {"max_len": 80, "remat": True}
DEMO_EVAL = {"max_new_tokens": 40, "batch_size": 32}
QUICK = {"limit": 8, "max_new_tokens": 16, "max_len": 64, "per_kind": 2}


def run_demo(out: str, quick: bool = False, overwrite: bool = False, max_new_tokens: Optional[int] = None,
             dtype: str = "bfloat16") -> dict:
    """The main job: MoGU on the embedded SmolLM2-135M-Instruct, end to end, with progress throughout."""
    from mogu_jax import api, synth
    from mogu_jax import evaluate as E
    from mogu_jax.train_config import load_config
    from mogu_jax.trainer import run_stage

    t0 = time.perf_counter()
    out = os.path.abspath(out)
    if os.path.exists(out) and os.listdir(out):
        if not overwrite:
            raise MoguError(f"{out} is not empty; pass --overwrite to start the demo again there")
        shutil.rmtree(out)
    os.makedirs(out)
    timings = {}

    def step(name):
        print(f"\n==> {name}", flush=True)
        return time.perf_counter()

    t = step("1/6 import the embedded SmolLM2-135M-Instruct (GGUF -> our checkpoint)")
    base_ckpt = os.path.join(out, "smollm2")
    api.convert_hf_to_jax("smollm2", base_ckpt, progress=True)
    timings["import"] = time.perf_counter() - t

    t = step("2/6 build the stage data from the shipped seed lists (base model answers, refusal bank)")
    # bf16 weights for generation: decoding reads every weight per token
    cfg, params, tok = api.load(base_ckpt, dtype=dtype, param_dtype=_weights_dtype(dtype))
    limit = QUICK["limit"] if quick else None
    gen_tokens = max_new_tokens or (QUICK["max_new_tokens"] if quick else DEMO_DATA["max_new_tokens"])
    data_dir = os.path.join(out, "data")
    summary = synth.build_data(cfg, params, tok, data_dir, max_new_tokens=gen_tokens,
                               batch_size=DEMO_DATA["batch_size"], limit=limit, progress=True)
    del params
    timings["data"] = time.perf_counter() - t

    # one length bucket: every stage compiles its step once (on 2 CPU cores a compile costs ~20 s)
    max_len = QUICK["max_len"] if quick else DEMO_TRAIN["max_len"]
    stage_dirs = {}
    for i, stage in enumerate(("glad", "unwilling", "router"), start=3):
        t = step(f"{i}/6 train the {stage} stage")
        over = [f"model.base={base_ckpt}", f"model.dtype={dtype}", f"output.dir={os.path.join(out, stage)}",
                f"model.remat={str(DEMO_TRAIN['remat']).lower()}",
                f"model.param_dtype={_weights_dtype(dtype) or 'null'}",
                f"data.{stage}.jsonl={os.path.join(data_dir, stage + '.jsonl')}", f"data.max_len={max_len}",
                f"data.buckets=[{max_len}]", "mesh.data=1", "checkpoint.every=1000", "output.tensorboard=false"]
        over += [f"{k}={v}" for k, v in DEMO[stage].items()]
        if quick:
            over += ["train.epochs=1"]
        if stage == "router":
            over += [f"inputs.glad={stage_dirs['glad']}", f"inputs.unwilling={stage_dirs['unwilling']}"]
        res = run_stage(load_config(stage, None, over), progress=True)
        stage_dirs[stage] = res["out_dir"]
        timings[stage] = time.perf_counter() - t

    t = step("6/6 evaluate base vs MoGU on the held-out split, export the PyTorch artifacts")
    mogu_ckpt = os.path.join(out, "mogu")
    _assemble(base_ckpt, stage_dirs, mogu_ckpt)
    export = os.path.join(out, "pytorch")
    api.convert_jax_to_mogu(mogu_ckpt, export)
    cfg, params, tok = api.load(mogu_ckpt, dtype=dtype, param_dtype=_weights_dtype(dtype))
    rows = E.load_prompts(os.path.join(data_dir, "heldout.jsonl"))
    if quick:
        rows = _take_per_kind(rows, QUICK["per_kind"])
    report_dir = os.path.join(out, "report")
    eval_tokens = max_new_tokens or (QUICK["max_new_tokens"] if quick else DEMO_EVAL["max_new_tokens"])
    report = run_eval(cfg, params, tok, rows, report_dir, max_new_tokens=eval_tokens,
                      batch_size=DEMO_EVAL["batch_size"])
    timings["eval"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    with open(os.path.join(out, "timings.json"), "w") as f:
        json.dump({"timings_s": timings, "data": summary, "quick": quick}, f, indent=2, default=str)
    print("\n" + E.format_table(report))
    print(f"\nwall time {timings['total'] / 60:.1f} min "
          f"({', '.join(f'{k} {v:.0f}s' for k, v in timings.items() if k != 'total')})")
    print(f"report:            {report_dir}/report.md, report.json, refusal_rates.png, router_layers.png")
    print(f"MoGU checkpoint:   {mogu_ckpt}")
    print(f"PyTorch artifacts: {export}/glad, {export}/unwilling (PEFT LoRA), {export}/router.pth")
    return {"report": report, "timings": timings, "out": out}


def _weights_dtype(dtype: str):
    """Frozen weights stored in the compute dtype when it is bf16 (half the bytes per decoded token, no cast per
    train step); fp32 stays as stored."""
    return "bfloat16" if str(dtype) in ("bfloat16", "bf16") else None


def _take_per_kind(rows, n):
    seen: dict = {}
    out = []
    for r in rows:
        if seen.get(r["kind"], 0) < n:
            out.append(r)
            seen[r["kind"]] = seen.get(r["kind"], 0) + 1
    return out


def _assemble(base_ckpt: str, stage_dirs: dict, out_dir: str) -> None:
    """Our MoGU checkpoint from the base checkpoint and the three stages' trained parts (every token routed:
    SmolLM2 has no refusal behaviour of its own to hand off to)."""
    import jax

    from mogu_jax.checkpoint import load_checkpoint, load_tokenizer, save_checkpoint
    from mogu_jax.config import ModelConfig
    from mogu_jax.trainer import restore_part

    cfg, base, meta = load_checkpoint(base_ckpt)
    stage_cfg = json.load(open(os.path.join(stage_dirs["router"], "final", "router", "stage.json")))["model_config"]
    cfg = ModelConfig.from_dict(stage_cfg).replace(routed_tokens=-1, dtype="float32", remat=False)
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
