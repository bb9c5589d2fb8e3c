"""The ``mogu-jax`` command. Bad input prints one ``mogu-jax: error: ...`` line and exits 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Optional, Sequence

import numpy as np

from mogu_jax.errors import MoguError


def _add_convert(sub):
    p = sub.add_parser("convert", help="convert checkpoints between Hugging Face / GGUF and mogu_jax")
    csub = p.add_subparsers(dest="direction", required=True)
    a = csub.add_parser("hf-to-jax", help="HF folder (safetensors or .bin), .gguf file or 'smollm2' -> our checkpoint")
    a.add_argument("src")
    a.add_argument("out_dir")
    a.add_argument("--dtype", default=None, help="cast weights (default: keep the source dtype, bit-exact)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing, different checkpoint")
    b = csub.add_parser("jax-to-hf", help="our checkpoint -> HF folder loadable by AutoModelForCausalLM")
    b.add_argument("ckpt_dir")
    b.add_argument("out_dir")
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--max-shard-size", type=float, default=5.0, help="GiB per safetensors shard (default 5)")
    c = csub.add_parser("mogu-to-jax", help="base model + published MoGU adapters/router -> our checkpoint")
    c.add_argument("out_dir")
    c.add_argument("--base", required=True, help="HF folder, .gguf, 'smollm2' or one of our checkpoints")
    c.add_argument("--glad", help="glad PEFT adapter folder")
    c.add_argument("--unwilling", help="unwilling PEFT adapter folder")
    c.add_argument("--router", help="router file (torch.save .pth, or .safetensors)")
    c.add_argument("--mogu-dir", help="released layout: resp_glad/<N>_lora, resp_unwill/<N>_lora, "
                                      "router_layer/<N>_router.pth")
    c.add_argument("--release", choices=["llama2", "vicuna", "falcon"],
                   help="with --mogu-dir: use the checkpoint numbers the authors used for this model")
    c.add_argument("--glad-step", type=int)
    c.add_argument("--unwilling-step", type=int)
    c.add_argument("--router-step", type=int)
    c.add_argument("--router-layers", help="comma-separated layer ids that carry a router (MoGU v2 subset)")
    c.add_argument("--overwrite", action="store_true")
    d = csub.add_parser("jax-to-mogu", help="our MoGU checkpoint -> glad/ and unwilling/ PEFT folders + router.pth")
    d.add_argument("ckpt_dir")
    d.add_argument("out_dir")
    d.add_argument("--overwrite", action="store_true")


def _add_generate(sub):
    p = sub.add_parser("generate", help="batched, cached generation")
    p.add_argument("ckpt", help="our checkpoint, an HF folder, a .gguf file or 'smollm2' (converted on the fly)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help='JSONL file of {"id", "prompt"} lines')
    src.add_argument("--prompt", help="one prompt; the response is printed to stdout")
    p.add_argument("--out", help="output JSONL (with --prompts)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--template", default=None, help="llama2-chat | vicuna | falcon (default: tokenizer chat template)")
    p.add_argument("--system", default=None, help="system prompt for chat templates")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
    p.add_argument("--mode", default=None, choices=["base", "glad", "unwilling", "routed"],
                   help="MoGU mode every new token is decoded in (default: routed decoding with handoff when the "
                        "checkpoint has MoGU parts, else base)")
    p.add_argument("--routed-tokens", default=None,
                   help="routed decoding: the first M new tokens routed, then the base model ('all': every token); "
                        "default from the model config (5 as published; all for SmolLM2)")
    p.add_argument("--base-only", action="store_true", help="the plain base model, no branches or routers")
    p.add_argument("--router-trace", help="save per-token, per-layer router weights a and b of the routed tokens "
                                          "(.npz)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def _add_train(sub):
    p = sub.add_parser("train", help="train one MoGU stage (glad, unwilling, router)")
    p.add_argument("stage", choices=["glad", "unwilling", "router"])
    p.add_argument("--config", action="append", default=[],
                   help="YAML config (see configs/); repeat to layer files, later ones win")
    p.add_argument("--resume", action="store_true", help="continue the run in output.dir from its last checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=2 optim.lr=1e-4")


def _add_eval(sub):
    p = sub.add_parser("eval", help="base vs MoGU on prompts with a kind (harmful, jailbreak, benign, borderline)")
    p.add_argument("ckpt", help="a MoGU checkpoint (glad, unwilling and router parts)")
    p.add_argument("--prompts", required=True, help="JSONL {prompt, kind[, id]}, AdvBench harmful_behaviors.csv or "
                                                    "a JailbreakBench behaviours CSV")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--routed-tokens", default=None, help="M or 'all' (default from the model config)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--template", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--overwrite", action="store_true")


def _add_data(sub):
    p = sub.add_parser("data", help="build the stage data files")
    dsub = p.add_subparsers(dest="data_command", required=True)
    b = dsub.add_parser("build", help="seed instruction lists -> glad / unwilling / router files + held-out prompts")
    b.add_argument("--model", required=True, help="the base model (our checkpoint, HF folder, .gguf or smollm2)")
    b.add_argument("--out", required=True)
    b.add_argument("--template", default=None)
    b.add_argument("--max-new-tokens", type=int, default=96)
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--limit", type=int, default=None, help="at most this many seed rows per kind (quick runs)")
    b.add_argument("--refusals", choices=["bank", "model"], default="bank",
                   help="refusal targets: the shipped bank, or the base model under a safety system prompt")
    b.add_argument("--no-prime", action="store_true", help="do not prime malicious answers with an affirmative opening")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--dtype", default="float32")
    b.add_argument("--overwrite", action="store_true")


def _add_demo(sub):
    p = sub.add_parser("demo", help="the end-to-end MoGU demo on the embedded SmolLM2-135M-Instruct")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="the same pipeline on a tiny slice (CI, tests)")
    p.add_argument("--overwrite", action="store_true")


class _Intermixed(argparse.ArgumentParser):
    """A command's parser that takes ``key=value`` overrides after its options too
    (``mogu-jax train glad --config X a=b``; plain argparse stops at the first option)."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inside or any(isinstance(a, argparse._SubParsersAction) for a in self._actions):
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mogu-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Intermixed)
    _add_convert(sub)
    _add_generate(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_data(sub)
    _add_demo(sub)
    _add_plan(sub)
    return parser


def _add_plan(sub):
    from mogu_jax.plan_cli import add_arguments
    add_arguments(sub.add_parser("plan", help="compile a stage for a TPU topology: per-chip memory, fit, speed"))


def read_prompts(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise MoguError(f"prompts file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MoguError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise MoguError(f'{path}:{n}: each line needs a string "prompt" field')
            row.setdefault("id", len(rows))
            rows.append(row)
    if not rows:
        raise MoguError(f"prompts file {path} has no prompts")
    return rows


def write_jsonl_atomic(path: str, rows: list[dict], overwrite: bool) -> None:
    if os.path.exists(path) and not overwrite:
        raise MoguError(f"{path} already exists; pass --overwrite to replace it")
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def decoding_mode(cfg, params, mode, routed_tokens, base_only, max_new_tokens):
    """(mode, routed_tokens) for generate: explicit --mode wins; else routed decoding with handoff when the
    params hold every MoGU part, else the base model."""
    from mogu_jax.model import split_params
    parts = split_params(params)[1]
    has_mogu = all(k in parts for k in ("glad", "unwilling", "router"))
    if base_only:
        if mode not in (None, "base") or routed_tokens is not None:
            raise MoguError("--base-only excludes --mode and --routed-tokens")
        return "base", None
    if routed_tokens is not None:
        if mode not in (None, "routed"):
            raise MoguError("--routed-tokens goes with routed decoding, not --mode " + mode)
        mode = "routed"
    if mode is None:
        mode = "routed" if has_mogu else "base"
    if mode == "routed" and not has_mogu:
        missing = [k for k in ("glad", "unwilling", "router") if k not in parts]
        raise MoguError(f"routed decoding needs a MoGU checkpoint; this one has no {', '.join(missing)} "
                        "(train the stages or convert published artifacts with `convert mogu-to-jax`)")
    if mode != "routed":
        return mode, None
    if routed_tokens is None:
        m = cfg.routed_tokens
    elif str(routed_tokens).lower() == "all":
        m = -1
    else:
        try:
            m = int(routed_tokens)
        except ValueError:
            raise MoguError(f"--routed-tokens takes a number or 'all', got {routed_tokens!r}") from None
        if m < 0:
            raise MoguError(f"--routed-tokens must be >= 0 or 'all', got {m}")
    return "routed", (None if m < 0 or m >= max_new_tokens else m)


def write_router_trace(path: str, rows, outs, cfg) -> None:
    """npz: ids, the routed layer ids, and per row a_<i> / b_<i> arrays [n_routed_tokens, n_routed_layers]."""
    arrays = {"ids": np.asarray([str(r["id"]) for r in rows]), "layers": np.asarray(cfg.router_layer_ids)}
    for i, o in enumerate(outs):
        arrays[f"a_{i}"] = np.asarray(o["router"]["a"], np.float32)
        arrays[f"b_{i}"] = np.asarray(o["router"]["b"], np.float32)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=d)
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def cmd_convert(args) -> int:
    from mogu_jax import api
    if args.direction == "hf-to-jax":
        api.convert_hf_to_jax(args.src, args.out_dir, overwrite=args.overwrite, dtype=args.dtype, progress=True)
    elif args.direction == "mogu-to-jax":
        layers = None
        if args.router_layers:
            try:
                layers = tuple(int(x) for x in args.router_layers.split(","))
            except ValueError:
                raise MoguError(f"--router-layers takes comma-separated integers, got {args.router_layers!r}") from None
        steps = {"glad": args.glad_step, "unwilling": args.unwilling_step, "router": args.router_step}
        api.convert_mogu_to_jax(args.base, args.out_dir, glad=args.glad, unwilling=args.unwilling,
                                router=args.router, mogu_dir=args.mogu_dir, release=args.release,
                                steps={k: v for k, v in steps.items() if v is not None}, router_layers=layers,
                                overwrite=args.overwrite, progress=True)
    elif args.direction == "jax-to-mogu":
        api.convert_jax_to_mogu(args.ckpt_dir, args.out_dir, overwrite=args.overwrite)
    else:
        api.convert_jax_to_hf(args.ckpt_dir, args.out_dir, overwrite=args.overwrite, progress=True,
                              max_shard_bytes=int(args.max_shard_size * 1024**3))
    print(f"wrote {args.out_dir}")
    return 0


def cmd_generate(args) -> int:
    from mogu_jax import api
    from mogu_jax.generate import generate_text
    if args.prompts:
        if not args.out:
            raise MoguError("--prompts needs --out")
        rows = read_prompts(args.prompts)
        if os.path.exists(args.out) and not args.overwrite:
            raise MoguError(f"{args.out} already exists; pass --overwrite to replace it")
    else:
        rows = [{"id": 0, "prompt": args.prompt}]
    cfg, params, tok = api.load(args.ckpt, dtype=args.dtype, progress=True)
    if tok is None:
        raise MoguError(f"{args.ckpt} has no tokenizer; text generation needs one")
    mode, routed = decoding_mode(cfg, params, args.mode, args.routed_tokens, args.base_only, args.max_new_tokens)
    if args.router_trace and mode != "routed":
        raise MoguError("--router-trace needs routed decoding (a checkpoint with routers, not --base-only)")
    outs = generate_text(cfg, params, tok, [r["prompt"] for r in rows], template=args.template, system=args.system,
                         batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                         progress=len(rows) > 1, mode=mode, routed_tokens=routed)
    if args.router_trace:
        write_router_trace(args.router_trace, rows, outs, cfg)
    if args.prompts:
        out_rows = []
        for r, o in zip(rows, outs):
            line = {"id": r["id"], "prompt": r["prompt"], "response": o["response"], "tokens": o["tokens"]}
            if "router" in o and len(o["router"]["a"]):
                line["router_a_mean"] = float(np.mean(o["router"]["a"]))
                line["router_b_mean"] = float(np.mean(o["router"]["b"]))
            out_rows.append(line)
        write_jsonl_atomic(args.out, out_rows, args.overwrite)
        print(f"wrote {len(out_rows)} responses to {args.out}", file=sys.stderr)
    else:
        print(outs[0]["response"])
    return 0


def cmd_train(args) -> int:
    from mogu_jax.train_config import load_config
    from mogu_jax.trainer import run_stage
    conf = load_config(args.stage, args.config, args.overrides)
    res = run_stage(conf, resume=args.resume)
    last = res["last"]
    print(f"{args.stage}: {res['updates']}/{res['total_updates']} updates, last loss "
          f"{last.get('loss', float('nan')):.4f}; outputs in {res['out_dir']}", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from mogu_jax import api
    from mogu_jax import evaluate as E
    from mogu_jax.io_utils import check_output_dir
    from mogu_jax.pipeline import run_eval
    rows = E.load_prompts(args.prompts)
    check_output_dir(args.out, args.overwrite)
    cfg, params, tok = api.load(args.ckpt, dtype=args.dtype)
    report = run_eval(cfg, params, tok, rows, args.out, template=args.template, routed_tokens=args.routed_tokens,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, overwrite=args.overwrite)
    print(E.format_table(report))
    print(f"report in {args.out}")
    return 0


def cmd_data(args) -> int:
    from mogu_jax import api, synth
    from mogu_jax.io_utils import check_output_dir
    check_output_dir(args.out, args.overwrite)
    cfg, params, tok = api.load(args.model, dtype=args.dtype)
    if tok is None:
        raise MoguError(f"{args.model} has no tokenizer")
    summary = synth.build_data(cfg, params, tok, args.out, template=args.template, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, limit=args.limit, seed=args.seed,
                               refusal_source=args.refusals, prime_malicious=not args.no_prime,
                               overwrite=args.overwrite)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_demo(args) -> int:
    from mogu_jax.pipeline import run_demo
    run_demo(args.out, quick=args.quick, overwrite=args.overwrite)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "convert":
            return cmd_convert(args)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "train":
            return cmd_train(args)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "data":
            return cmd_data(args)
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "plan":
            from mogu_jax.plan_cli import cmd_plan
            return cmd_plan(args)
    except MoguError as e:
        print(f"mogu-jax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mogu-jax: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
