"""``mogu-jax plan``: arguments, the report, and the one-line answer when a stage does not fit
(the compiling itself is :mod:`mogu_jax.plan`)."""

from __future__ import annotations

import argparse

from mogu_jax.errors import MoguError

GiB = 1024 ** 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=["glad", "unwilling", "router", "generate"])
    p.add_argument("--config", action="append", default=[], help="YAML config(s), as for train (model.architecture "
                   "describes the base: no download)")
    p.add_argument("--topology", required=True, help="TPU slice: v4-8, v5e-16, v5p-32, v6e-16, or v5e:4x4, "
                   "v5p:2x2x2 ...")
    p.add_argument("--batch", type=int, default=None, help="rows per batch shard (per chip with data x fsdp = all "
                   "chips); default 1; for generate the global batch (default 1)")
    p.add_argument("--max-batch", action="store_true", help="find the largest per-chip batch that fits (bisection "
                   "over compiles)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the speed estimate (0.4)")
    p.add_argument("--context", type=int, default=2048, help="generate: KV cache slots (default 2048)")
    p.add_argument("--new-tokens", type=int, default=256, help="generate: tokens after the prompt (default 256)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. mesh.fsdp=-1 mesh.data=1")


def _gib(n) -> str:
    return f"{n / GiB:7.2f} GiB"


def _knobs(conf: dict, topo, batch: int) -> str:
    mesh = conf["mesh"]
    out = []
    if not (mesh.get("fsdp") == -1 or int(mesh.get("fsdp", 1)) * int(mesh.get("tensor", 1)) >= topo.chips):
        out.append("shard parameters over more chips (mesh.data=1 mesh.fsdp=-1, or mesh.tensor=...)")
    if not conf["model"]["remat"]:
        out.append("model.remat=true")
    if batch > 1:
        out.append("a smaller --batch")
    if int(conf["data"]["max_len"]) > 256:
        out.append("a shorter data.max_len")
    out.append("a bigger slice")
    return "; try " + ", ".join(out)


def _stage_report(conf, plan, mfu: float) -> list[str]:
    from mogu_jax.plan import throughput

    b, hbm = plan.bytes, plan.topology.chip.hbm
    tp = throughput(conf, plan, mfu)
    lines = [f"{plan.stage} stage on {plan.topology.name} ({plan.topology.chips} chips, {plan.topology.libtpu_name}); "
             f"mesh {plan.mesh}; micro-batch {plan.global_batch} x {plan.seq_len} tokens "
             f"({plan.per_chip_batch} per batch shard), grad_accum {plan.grad_accum}; compiled in {plan.compile_s:.1f} s",
             f"  per chip: frozen params      {_gib(b['frozen'])}  ({plan.counts['frozen'] / 1e9:.2f} B parameters)",
             f"            trainable params   {_gib(b['trainable'])}  ({plan.counts['trainable'] / 1e6:.2f} M parameters)",
             f"            optimizer state    {_gib(b['optimizer'])}",
             f"            grad accumulator   {_gib(b['grad_accumulator'])}",
             f"            batch              {_gib(b['batch'])}",
             f"            temporaries        {_gib(b['temporaries'])}",
             f"            total              {_gib(b['total'])}  of {hbm / GiB:.0f} GiB HBM "
             f"({100 * b['total'] / hbm:.0f}%)",
             f"  FLOPs per token {tp['flops_per_token'] / 1e9:.1f} G (frozen base: forward + activation gradients)"
             f"; at {100 * mfu:.0f}% MFU {tp['tokens_per_s']:,.0f} tokens/s"]
    if tp["seconds"]:
        lines.append(f"  schedule: {tp['updates']} updates x {tp['examples_per_update']} examples "
                     f"= {tp['tokens'] / 1e6:.1f} M tokens (rows padded to {plan.seq_len}): "
                     f"{tp['seconds'] / 60:.1f} min")
    return lines


def _generate_report(g) -> list[str]:
    b, hbm = g.bytes, g.topology.chip.hbm
    return [f"routed generation on {g.topology.name} ({g.topology.chips} chips); mesh {g.mesh}; batch {g.batch}, "
            f"context {g.context} (prompt {g.prompt}); compiled in {g.compile_s:.1f} s",
            f"  per chip: parameters         {_gib(b['params'])}",
            f"            KV caches (2)      {_gib(b['kv_caches'])}",
            f"            prefill temps      {_gib(b['prefill_temporaries'])}",
            f"            decode temps       {_gib(b['decode_temporaries'])}",
            f"            total              {_gib(b['total'])}  of {hbm / GiB:.0f} GiB HBM "
            f"({100 * b['total'] / hbm:.0f}%)"]


def cmd_plan(args) -> int:
    from mogu_jax import plan as PL
    from mogu_jax.train_config import load_config

    topo = PL.parse_topology(args.topology)
    conf = load_config("router" if args.stage == "generate" else args.stage, args.config, args.overrides)
    PL.model_config(conf)  # the config must describe the model before anything is compiled
    PL.check_mesh(conf["mesh"], topo)
    devices = PL.topology_devices(topo)
    try:
        if args.stage == "generate":
            g = PL.plan_generate(conf, topo, args.batch or 1, args.context, args.new_tokens, devices)
            lines = _generate_report(g)
            total = g.bytes["total"]
        else:
            if args.max_batch:
                n, plan = PL.max_batch(conf, topo, devices)
                if plan is None:
                    raise PL.DoesNotFit(f"the {args.stage} stage on {topo.name} at 1 row per chip",
                                        "see --batch 1 for the compiler's numbers", None)
            else:
                plan = PL.plan_stage(conf, topo, args.batch or 1, devices)
            lines = _stage_report(conf, plan, args.mfu)
            if args.max_batch:
                lines.append(f"  largest batch that fits: {n} per batch shard ({n * plan.global_batch // plan.per_chip_batch} global)")
            total = plan.bytes["total"]
    except PL.DoesNotFit as e:
        raise MoguError(str(e) + _knobs(conf, topo, args.batch or 1)) from None
    print("\n".join(lines))
    if total > topo.chip.hbm:
        raise MoguError(f"does not fit by {(total - topo.chip.hbm) / GiB:.2f} GiB per chip "
                        f"({total / GiB:.2f} of {topo.chip.hbm / GiB:.0f} GiB)" + _knobs(conf, topo, args.batch or 1))
    return 0
