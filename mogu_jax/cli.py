"""The ``mogu-jax`` command. Bad input prints one ``mogu-jax: error: ...`` line and exits 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

import numpy as np

from mogu_jax.cli_inputs import (NON_NEGATIVE_INT, POSITIVE_INT, fit_prompts, layer_ids, number, path_arg,
                                 read_prompts, routed_tokens, with_handoff)
from mogu_jax.config import HANDOFFS
from mogu_jax.errors import MoguError
from mogu_jax.io_utils import check_output_file, write_file_atomic, write_jsonl_atomic


class UsageError(MoguError):
    """A command line argparse refuses (unknown option, missing argument, a value of the wrong type)."""


class _Parser(argparse.ArgumentParser):
    """argparse with our one-line error: ``mogu-jax: error: ...``, exit 2, no usage dump."""

    def error(self, message):
        sub = self.prog.removeprefix("mogu-jax").strip()
        raise UsageError(f"{sub + ': ' if sub else ''}{message} (see `{self.prog} --help`)")


DTYPE_HELP = ("compute dtype: auto (default: bf16 where the hardware multiplies bf16 natively, else fp32; "
              "the choice and its reason are printed), float32 or bfloat16")


def _add_convert(sub):
    p = sub.add_parser("convert", help="convert checkpoints between Hugging Face / GGUF and mogu_jax")
    csub = p.add_subparsers(dest="direction", required=True)
    a = csub.add_parser("hf-to-jax", help="HF folder (safetensors or .bin), .gguf file or 'smollm2' -> our checkpoint")
    a.add_argument("src", type=path_arg)
    a.add_argument("out_dir", type=path_arg)
    a.add_argument("--dtype", default=None, help="cast weights (default: keep the source dtype, bit-exact)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing, different checkpoint")
    b = csub.add_parser("jax-to-hf", help="our checkpoint -> HF folder loadable by AutoModelForCausalLM")
    b.add_argument("ckpt_dir", type=path_arg)
    b.add_argument("out_dir", type=path_arg)
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--max-shard-size", type=number(float, 0, 1e6, low_open=True), default=5.0,
                   help="GiB per safetensors shard (default 5)")
    c = csub.add_parser("mogu-to-jax", help="base model + published MoGU adapters/router -> our checkpoint")
    c.add_argument("out_dir", type=path_arg)
    c.add_argument("--base", type=path_arg, required=True,
                   help="HF folder, .gguf, 'smollm2' or one of our checkpoints")
    c.add_argument("--glad", type=path_arg, help="glad PEFT adapter folder")
    c.add_argument("--unwilling", type=path_arg, help="unwilling PEFT adapter folder")
    c.add_argument("--router", type=path_arg, help="router file (torch.save .pth, or .safetensors)")
    c.add_argument("--mogu-dir", type=path_arg,
                   help="released layout: resp_glad/<N>_lora, resp_unwill/<N>_lora, router_layer/<N>_router.pth")
    c.add_argument("--release", choices=["llama2", "vicuna", "falcon"],
                   help="with --mogu-dir: use the checkpoint numbers the authors used for this model")
    c.add_argument("--glad-step", type=NON_NEGATIVE_INT)
    c.add_argument("--unwilling-step", type=NON_NEGATIVE_INT)
    c.add_argument("--router-step", type=NON_NEGATIVE_INT)
    c.add_argument("--router-layers", type=layer_ids,
                   help="comma-separated layer ids that carry a router (MoGU v2 subset)")
    c.add_argument("--overwrite", action="store_true")
    d = csub.add_parser("jax-to-mogu", help="our MoGU checkpoint -> glad/ and unwilling/ PEFT folders + router.pth")
    d.add_argument("ckpt_dir", type=path_arg)
    d.add_argument("out_dir", type=path_arg)
    d.add_argument("--overwrite", action="store_true")


def _add_generate(sub):
    p = sub.add_parser("generate", help="batched, cached generation")
    p.add_argument("ckpt", type=path_arg,
                   help="our checkpoint, an HF folder, a .gguf file or 'smollm2' (converted on the fly)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=path_arg, help='JSONL file of {"id", "prompt"} lines')
    src.add_argument("--prompt", help="one prompt; the response is printed to stdout")
    p.add_argument("--out", type=path_arg, help="output JSONL (with --prompts)")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=256)
    p.add_argument("--temperature", type=number(float, 0), default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=1.0)
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    p.add_argument("--template", default=None, help="llama2-chat | vicuna | falcon (default: tokenizer chat template)")
    p.add_argument("--system", default=None, help="system prompt for chat templates")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8)
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    _add_truncate(p)
    p.add_argument("--mode", default=None, choices=["base", "glad", "unwilling", "routed"],
                   help="MoGU mode every new token is decoded in (default: routed decoding with handoff when the "
                        "checkpoint has MoGU parts, else base)")
    p.add_argument("--routed-tokens", type=routed_tokens, default=None,
                   help="routed decoding: the first M new tokens routed, then the base model ('all': every token); "
                        "default from the model config (5 as published; all for SmolLM2)")
    _add_handoff(p)
    p.add_argument("--base-only", action="store_true", help="the plain base model, no branches or routers")
    p.add_argument("--router-trace", type=path_arg,
                   help="save per-token, per-layer router weights a and b of the routed tokens (.npz)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def _add_train(sub):
    p = sub.add_parser("train", help="train one MoGU stage (glad, unwilling, router)")
    p.add_argument("stage", choices=["glad", "unwilling", "router"])
    p.add_argument("--config", type=path_arg, action="append", default=[],
                   help="YAML config (see configs/); repeat to layer files, later ones win")
    p.add_argument("--resume", action="store_true", help="continue the run in output.dir from its last checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=2 optim.lr=1e-4")


def _add_eval(sub):
    p = sub.add_parser("eval", help="base vs MoGU on prompts with a kind (harmful, jailbreak, benign, borderline)")
    p.add_argument("ckpt", type=path_arg, help="a MoGU checkpoint (glad, unwilling and router parts)")
    p.add_argument("--prompts", type=path_arg, required=True,
                   help="JSONL {prompt, kind[, id]}, AdvBench harmful_behaviors.csv, a JailbreakBench behaviours "
                        "CSV, or with --prompt-column any .csv, .tsv or .jsonl file")
    p.add_argument("--prompt-column", default=None, help="read the prompt from this column (field) of a .csv, .tsv "
                                                         "or .jsonl file")
    p.add_argument("--kind-column", default=None, help="with --prompt-column: the column holding each row's kind "
                                                       "(its values mapped by --kind-map)")
    p.add_argument("--kind-map", default=None, help="with --kind-column: value=kind pairs, e.g. "
                                                    "'safe=benign,unsafe=harmful' (values not listed must be kinds)")
    p.add_argument("--kind", default=None, help="harmful | jailbreak | benign | borderline: the kind of every row "
                                                "(AdvBench/JailbreakBench CSVs: default harmful; JSONL: rows without "
                                                "one); with --kind-column: evaluate only the rows of this kind")
    p.add_argument("--out", type=path_arg, required=True, help="report folder")
    p.add_argument("--routed-tokens", type=routed_tokens, default=None,
                   help="M or 'all' (default from the model config)")
    _add_handoff(p)
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=96)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=16)
    p.add_argument("--template", default=None)
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    _add_truncate(p)
    p.add_argument("--overwrite", action="store_true")


def _add_data(sub):
    p = sub.add_parser("data", help="build the stage data files")
    dsub = p.add_subparsers(dest="data_command", required=True)
    b = dsub.add_parser("build", help="seed instruction lists -> glad / unwilling / router files + dev / test prompts")
    b.add_argument("--model", type=path_arg, required=True,
                   help="the base model (our checkpoint, HF folder, .gguf or smollm2)")
    b.add_argument("--out", type=path_arg, required=True)
    b.add_argument("--template", default=None)
    b.add_argument("--max-new-tokens", type=POSITIVE_INT, default=96)
    b.add_argument("--batch-size", type=POSITIVE_INT, default=16)
    b.add_argument("--limit", type=POSITIVE_INT, default=None, help="at most this many seed rows per kind (quick runs)")
    b.add_argument("--refusals", choices=["bank", "model"], default="bank",
                   help="refusal targets: the shipped bank, or the base model under a safety system prompt")
    b.add_argument("--no-prime", action="store_true", help="do not prime malicious answers with an affirmative opening")
    b.add_argument("--wrap-every", type=POSITIVE_INT, default=None,
                   help="also give the router every N-th benign and malicious train row inside a jailbreak template")
    b.add_argument("--twins", action="store_true",
                   help="also give the router the benign twins of the malicious train rows (same form, harmless)")
    b.add_argument("--borderline-train", action="store_true",
                   help="also give the router the train-only safe prompts that merely sound alarming")
    b.add_argument("--unsafe-twins", action="store_true",
                   help="also give the router the unsafe twins of the contrast train rows (the same alarming word "
                        "meant harmfully), with refusals")
    b.add_argument("--malicious-train", action="store_true",
                   help="also give the router the train-only malicious rows of other subjects and shapes, with "
                        "refusals, and their benign twins (with --wrap-every, some of each in long wrappers)")
    b.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    b.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    b.add_argument("--overwrite", action="store_true")


def _add_demo(sub):
    p = sub.add_parser("demo", help="the end-to-end MoGU demo on the embedded SmolLM2-135M-Instruct")
    p.add_argument("--out", type=path_arg, default="runs/demo")
    p.add_argument("--quick", action="store_true", help="the same pipeline on a tiny slice (CI, tests)")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--config", type=path_arg, default=None,
                   help="the demo's settings (default: the shipped configs/smollm2-135m.yaml; a copy to edit)")
    p.add_argument("--eval-split", choices=["dev", "test"], default="test",
                   help="the seed split evaluated at the end: test (reported, default) or dev (for choosing settings)")
    p.add_argument("--overwrite", action="store_true")


def _add_handoff(p):
    p.add_argument("--handoff", default=None, choices=list(HANDOFFS),
                   help="after the routed tokens: fixed (published: the base model continues every row) or router "
                        "(a row whose routers leaned unwilling stays routed); default from the model config")
    p.add_argument("--handoff-threshold", type=number(float, 0, 1), default=None,
                   help="--handoff router: the mean unwilling weight a over the routed tokens that keeps a row routed "
                        "(default from the model config, 0.2)")


def _add_truncate(p):
    p.add_argument("--truncate", choices=["left", "right"], default=None,
                   help="cut prompts too long for the model's positions (left: keep the end, right: keep the "
                        "start); default: refuse them, naming the prompt")


def _add_probe(sub):
    p = sub.add_parser("probe", help="linear probe per layer, benign vs malicious: where to put routers (MoGU v2)")
    p.add_argument("ckpt", help="the base model: our checkpoint, an HF folder, a .gguf file or 'smollm2'")
    p.add_argument("--data", required=True, help="'seeds' or 'seeds+contrast' (the seed lists' train rows), a router "
                                                 "stage file (instruction/output/label) or data folder, or a prompts "
                                                 "file (prompt/kind)")
    p.add_argument("--out", required=True, help="folder for probe.json and accuracy.png")
    p.add_argument("--top-k", type=int, default=4, help="layers to pick for model.router_layers (default 4)")
    p.add_argument("--holdout", type=float, default=0.25, help="share of each class held out for scoring")
    p.add_argument("--seed", type=int, default=0, help="seed of the first fit / held-out split")
    p.add_argument("--repeats", type=int, default=5, help="splits (seeds seed, seed+1, ...) the scores average over")
    p.add_argument("--template", default=None)
    p.add_argument("--system", default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=512, help="prompt tokens kept (the last ones)")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--overwrite", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mogu-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_generate(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_data(sub)
    _add_demo(sub)
    _add_probe(sub)
    _add_plan(sub)
    return parser


def _add_plan(sub):
    from mogu_jax.plan_cli import add_arguments
    add_arguments(sub.add_parser("plan", help="compile a stage for a TPU topology: per-chip memory, fit, speed"))




def write_router_trace(path: str, rows, outs, cfg) -> None:
    """npz: ids, the routed layer ids, and per row a_<i> / b_<i> arrays [n_routed_tokens, n_routed_layers]."""
    arrays = {"ids": np.asarray([str(r["id"]) for r in rows]), "layers": np.asarray(cfg.router_layer_ids)}
    for i, o in enumerate(outs):
        arrays[f"a_{i}"] = np.asarray(o["router"]["a"], np.float32)
        arrays[f"b_{i}"] = np.asarray(o["router"]["b"], np.float32)
    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path without it
            np.savez(f, **arrays)

    write_file_atomic(path, save)


def cmd_convert(args) -> int:
    from mogu_jax import api
    if args.direction == "hf-to-jax":
        api.convert_hf_to_jax(args.src, args.out_dir, overwrite=args.overwrite, dtype=args.dtype, progress=True)
    elif args.direction == "mogu-to-jax":
        layers = args.router_layers
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
    from mogu_jax.generate import decoding_mode, generate_text
    if args.prompts is not None:
        if args.out is None:
            raise MoguError("--prompts needs --out")
        check_output_file(args.out, args.overwrite, "--out")
        rows = read_prompts(args.prompts)
    else:
        if args.out is not None:
            raise MoguError("--out goes with --prompts; with --prompt the response is printed")
        if not args.prompt.strip():
            raise MoguError("--prompt is empty")
        rows = [{"id": 0, "prompt": args.prompt}]
    if args.router_trace is not None:
        check_output_file(args.router_trace, args.overwrite, "--router-trace")
    cfg, params, tok = api.load(args.ckpt, dtype=args.dtype, param_dtype="auto", progress=True)
    cfg = with_handoff(cfg, args.handoff, args.handoff_threshold)
    if tok is None:
        raise MoguError(f"{args.ckpt} has no tokenizer; text generation needs one")
    mode, routed = decoding_mode(cfg, params, args.mode, args.routed_tokens, args.base_only, args.max_new_tokens)
    if args.router_trace and mode != "routed":
        raise MoguError("--router-trace needs routed decoding (a checkpoint with routers, not --base-only)")
    rows = fit_prompts(rows, tok, cfg.max_position_embeddings, args.max_new_tokens, args.template, args.system,
                       args.truncate)
    outs = generate_text(cfg, params, tok, [r["prompt"] for r in rows], template=args.template, system=args.system,
                         batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                         progress=len(rows) > 1, mode=mode, routed_tokens=routed)
    if args.router_trace:
        write_router_trace(args.router_trace, rows, outs, cfg)
    if args.prompts is not None:
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


def eval_rows(args) -> list[dict]:
    """The rows ``mogu-jax eval`` evaluates: by named columns with --prompt-column, else the known shapes."""
    from mogu_jax import evaluate as E
    if args.prompt_column is None:
        if args.kind_column is not None or args.kind_map is not None:
            raise MoguError("--kind-column and --kind-map go with --prompt-column")
        return E.load_prompts(args.prompts, kind=args.kind)
    if args.kind_map is not None and args.kind_column is None:
        raise MoguError("--kind-map needs --kind-column (the column whose values it maps)")
    if args.kind_column is None and args.kind is None:
        raise MoguError("--prompt-column needs --kind-column (each row's kind) or --kind (one kind for every row)")
    kind_map = E.parse_kind_map(args.kind_map) if args.kind_map is not None else None
    return E.load_prompts_by_column(args.prompts, args.prompt_column, kind_column=args.kind_column,
                                    kind_map=kind_map, kind=args.kind)


def cmd_eval(args) -> int:
    from mogu_jax import api
    from mogu_jax import evaluate as E
    from mogu_jax.io_utils import check_output_dir
    from mogu_jax.pipeline import run_eval
    rows = eval_rows(args)
    check_output_dir(args.out, args.overwrite)
    cfg, params, tok = api.load(args.ckpt, dtype=args.dtype, param_dtype="auto")
    cfg = with_handoff(cfg, args.handoff, args.handoff_threshold)
    if tok is None:
        raise MoguError(f"{args.ckpt} has no tokenizer; evaluation needs one")
    rows = fit_prompts(rows, tok, cfg.max_position_embeddings, args.max_new_tokens, args.template, None,
                       args.truncate)
    report = run_eval(cfg, params, tok, rows, args.out, template=args.template, routed_tokens=args.routed_tokens,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, overwrite=args.overwrite)
    print(E.format_table(report))
    print(f"report in {args.out}")
    return 0


def cmd_data(args) -> int:
    from mogu_jax import api, synth
    from mogu_jax.io_utils import check_output_dir
    check_output_dir(args.out, args.overwrite)
    cfg, params, tok = api.load(args.model, dtype=args.dtype, param_dtype="auto")
    if tok is None:
        raise MoguError(f"{args.model} has no tokenizer")
    summary = synth.build_data(cfg, params, tok, args.out, template=args.template, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, limit=args.limit, seed=args.seed,
                               refusal_source=args.refusals, prime_malicious=not args.no_prime,
                               wrap_every=args.wrap_every, twins=args.twins,
                               borderline_train=args.borderline_train, unsafe_twins=args.unsafe_twins,
                               malicious_train=args.malicious_train, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_probe(args) -> int:
    from mogu_jax import probe
    result = probe.run_probe(args.ckpt, args.data, args.out, top_k=args.top_k, holdout=args.holdout, seed=args.seed,
                             repeats=args.repeats,
                             template=args.template, system=args.system, batch_size=args.batch_size,
                             max_len=args.max_len, dtype=args.dtype, overwrite=args.overwrite)
    print(probe.format_table(result))
    print(f"probe in {args.out} ({probe.PROBE_FILE}, {probe.PLOT_FILE}); train with "
          f"model.router_layers={','.join(str(i) for i in result['router_layers'])} "
          f"or model.router_layers=top-{result['top_k']}:{args.out}")
    return 0


def cmd_demo(args) -> int:
    from mogu_jax.io_utils import check_output_dir
    from mogu_jax.pipeline import run_demo
    check_output_dir(args.out, args.overwrite)  # before any work (the demo's own check comes later)
    run_demo(args.out, quick=args.quick, overwrite=args.overwrite, dtype=args.dtype, config=args.config,
             eval_split=args.eval_split)
    return 0


def _quiet_library_logs() -> None:
    """absl (orbax) and transformers warnings are not for CLI users: errors reach them as our one line."""
    logging.getLogger("absl").setLevel(logging.ERROR)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line -> namespace. ``train``'s and ``plan``'s ``key=value`` overrides may come anywhere after the stage
    (before, between or after the ``--config`` options); anything else argparse does not know is an error."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command in ("train", "plan") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args
    try:
        import absl.logging
        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:
        pass


def one_line(message: str, limit: int = 2000) -> str:
    """An error message as one line of at most ``limit`` characters (library messages can span many)."""
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def main(argv: Optional[Sequence[str]] = None) -> int:
    _quiet_library_logs()
    try:
        args = parse_args(argv)
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
        if args.command == "probe":
            return cmd_probe(args)
        if args.command == "plan":
            from mogu_jax.plan_cli import cmd_plan
            return cmd_plan(args)
    except MoguError as e:
        print(f"mogu-jax: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mogu-jax: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
