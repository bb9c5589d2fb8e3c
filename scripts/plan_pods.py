"""The README's pod table: `mogu-jax plan` over models x stages x TPU slices (XLA's TPU compiler on this host).

Each row is one compile (``--max-batch``: a bisection over compiles), appended to ``--out`` (JSON lines) as soon
as it is done, so a partial run keeps its rows; ``--table`` renders the markdown table from that file.

    python scripts/plan_pods.py --out runs/plan_pods.jsonl              # the default grid, in priority order
    python scripts/plan_pods.py --out runs/plan_pods.jsonl --only llama2-7b-chat:glad:v5p-32 --max-batch
    python scripts/plan_pods.py --table runs/plan_pods.jsonl

glad and unwilling compile the same step (the same shapes; only the learning rate and the number of updates
differ), so one compile serves both; their schedules are reported separately. Every row uses the published
hyper-parameters (max length 1024, configs/<model>.yaml) with the parameters sharded over all chips
(mesh.data=1 mesh.fsdp=-1) and one row per chip per micro-batch unless --max-batch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

LLAMA2_70B = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000, "hidden_act": "silu",
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float16"}
TOPOLOGIES = ("v5p-32", "v5e-16", "v4-8", "v6e-16")
MODELS = ("llama2-7b-chat", "falcon-7b-instruct")
MESH = ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1"]


def grid() -> list[tuple]:
    """(model, stage, topology, extra) in priority order: 7B training stages, routed generation, the attention
    kernels at 4096 tokens, 70B. Training rows use model.remat=true (without it a 7B stage at 1024 tokens needs
    ~31 GiB of temporaries per chip: measured on v4-8 and v5p-32)."""
    remat = {"overrides": ["model.remat=true"], "label": "remat"}
    rows = [("llama2-7b-chat", "glad", t, remat) for t in TOPOLOGIES]
    rows += [("llama2-7b-chat", "router", "v5p-32", remat), ("falcon-7b-instruct", "glad", "v5p-32", remat),
             ("falcon-7b-instruct", "glad", "v5e-16", remat)]
    rows += [("llama2-7b-chat", "generate", "v5e-16", {"batch": b}) for b in (1, 64)]
    rows += [("llama2-7b-chat", "glad", "v5p-32", {"overrides": ["data.max_len=4096", "model.remat=true"],
                                                   "label": "remat, 4096 tokens, splash"}),
             ("llama2-7b-chat", "glad", "v5p-32", {"overrides": ["data.max_len=4096", "model.remat=true",
                                                                 "model.attention=xla"],
                                                   "label": "remat, 4096 tokens, xla"})]
    rows += [("llama2-70b", "glad", "v5p-128", remat), ("llama2-70b", "glad", "v5p-64", remat)]
    rows += [(m, "router", t, remat) for m in MODELS for t in TOPOLOGIES if (m, t) != ("llama2-7b-chat", "v5p-32")]
    rows += [("falcon-7b-instruct", "glad", t, remat) for t in ("v4-8", "v6e-16")]
    return rows


def load(model: str, stage: str, overrides: list):
    from mogu_jax.train_config import load_config

    if model == "llama2-70b":
        path = os.path.join(REPO, "configs", "llama2-7b-chat.yaml")
        conf = load_config("router" if stage == "generate" else stage, path, MESH + overrides)
        conf["model"]["architecture"] = dict(LLAMA2_70B)
        return conf
    path = os.path.join(REPO, "configs", f"{model}.yaml")
    return load_config("router" if stage == "generate" else stage, path, MESH + overrides)


def run_row(model: str, stage: str, topology: str, extra: dict, max_batch: bool, mfu: float) -> dict:
    from mogu_jax import plan as PL

    topo = PL.parse_topology(topology)
    conf = load(model, stage, list(extra.get("overrides", [])))
    row = {"model": model, "stage": stage, "topology": topology, "chips": topo.chips, "label": extra.get("label", ""),
           "hbm_gib": topo.chip.hbm / PL.GiB}
    t0 = time.perf_counter()
    try:
        if stage == "generate":
            g = PL.plan_generate(conf, topo, extra.get("batch", 1), 2048, 256)
            row.update(batch=g.batch, context=g.context, bytes=g.bytes, compile_s=g.compile_s)
        else:
            if max_batch:
                n, plan = PL.max_batch(conf, topo, PL.topology_devices(topo))
                row["max_batch"] = n
                if plan is None:
                    raise PL.DoesNotFit(f"{stage} at 1 row per chip", "", None)
            else:
                plan = PL.plan_stage(conf, topo, 1)
            row.update(bytes=plan.bytes, compile_s=plan.compile_s, global_batch=plan.global_batch,
                       grad_accum=plan.grad_accum, seq=plan.seq_len, mesh=plan.mesh)
            stages = ("glad", "unwilling") if stage == "glad" else (stage,)
            row["schedule"] = {}
            for s in stages:
                tp = PL.throughput(load(model, s, list(extra.get("overrides", []))), plan, mfu)
                row["schedule"][s] = {"tokens_per_s": tp["tokens_per_s"], "minutes": (tp["seconds"] or 0) / 60,
                                      "tokens": tp["tokens"], "flops_per_token": tp["flops_per_token"]}
        row["fits"] = row["bytes"]["total"] <= topo.chip.hbm
    except PL.DoesNotFit as e:
        row.update(fits=False, error=str(e), over_gib=(e.over or 0) / PL.GiB)
    row["wall_s"] = time.perf_counter() - t0
    return row


def render(path: str) -> str:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    g = 1024 ** 3
    out = ["| model | stage | slice (chips) | per chip: frozen / trainable+opt / temps / total (GiB) | fits | "
           "max batch/chip | tokens/s @40% MFU | published schedule | compile |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = ", ".join(x for x in (r.get("label"), "memory at the max batch" if r.get("max_batch") else "") if x)
        name = r["model"] + (f" ({label})" if label else "")
        if "error" in r:
            m = re.search(r"\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", r["error"])
            over = r.get("over_gib") or (float(m.group(1)) - float(m.group(2)) if m else 0)
            out.append(f"| {name} | {r['stage']} | {r['topology']} ({r['chips']}) | does not fit: the compile runs out "
                       f"of HBM by at least {over:.1f} GiB | no | 0 | | | |")
            continue
        b = r["bytes"]
        if r["stage"] == "generate":
            mem = (f"params {b['params'] / g:.2f} / KV caches {b['kv_caches'] / g:.2f} / temps "
                   f"{max(b['prefill_temporaries'], b['decode_temporaries']) / g:.2f} / {b['total'] / g:.2f}")
            out.append(f"| {name} | routed generation, batch {r['batch']}, 2k context | {r['topology']} "
                       f"({r['chips']}) | {mem} | {'yes' if r['fits'] else 'no'} | | | | {r['compile_s']:.0f} s |")
            continue
        mem = (f"{b['frozen'] / g:.2f} / {(b['trainable'] + b['optimizer'] + b['grad_accumulator']) / g:.3f} / "
               f"{b['temporaries'] / g:.2f} / {b['total'] / g:.2f}")
        tps = next(iter(r["schedule"].values()))["tokens_per_s"]
        stage = "glad = unwilling" if r["stage"] == "glad" and len(r["schedule"]) == 2 else r["stage"]
        mins = "; ".join(f"{s} {v['minutes']:.1f} min" for s, v in r["schedule"].items())
        out.append(f"| {name} | {stage} | {r['topology']} ({r['chips']}) | {mem} | {'yes' if r['fits'] else 'no'} | "
                   f"{r.get('max_batch', '-')} | {tps:,.0f} | {mins} | {r['compile_s']:.0f} s |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "runs", "plan_pods.jsonl"))
    p.add_argument("--only", action="append", default=[], help="model:stage:topology (repeat)")
    p.add_argument("--max-batch", action="store_true", help="bisect the largest per-chip batch (many compiles)")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--shard", type=int, default=0, help="run rows shard, shard + shards, ... (parallel processes)")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--rows", help="comma-separated indices into the grid (after --only)")
    p.add_argument("--table", metavar="JSONL", help="print the markdown table of a results file and exit")
    args = p.parse_args()
    if args.table:
        print(render(args.table))
        return 0
    rows = grid()
    if args.only:
        want = {tuple(o.split(":")) for o in args.only}
        rows = [r for r in rows if r[:3] in want] or [(*o.split(":"), {}) for o in args.only]
    if args.rows:
        rows = [rows[int(i)] for i in args.rows.split(",")]
    rows = rows[args.shard::args.shards]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for model, stage, topology, extra in rows:
        row = run_row(model, stage, topology, extra, args.max_batch, args.mfu)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{model} {stage} {topology} {extra.get('label', '')}: fits={row['fits']} "
              f"total={row.get('bytes', {}).get('total', 0) / 1024 ** 3:.2f} GiB wall={row['wall_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
