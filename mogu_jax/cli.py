"""The ``mogu-jax`` command. Bad input prints one ``mogu-jax: error: ...`` line and exits 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Optional, Sequence

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
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mogu-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_generate(sub)
    return parser


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


def cmd_convert(args) -> int:
    from mogu_jax import api
    if args.direction == "hf-to-jax":
        api.convert_hf_to_jax(args.src, args.out_dir, overwrite=args.overwrite, dtype=args.dtype, progress=True)
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
    outs = generate_text(cfg, params, tok, [r["prompt"] for r in rows], template=args.template, system=args.system,
                         batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                         progress=len(rows) > 1)
    if args.prompts:
        out_rows = [{"id": r["id"], "prompt": r["prompt"], "response": o["response"], "tokens": o["tokens"]}
                    for r, o in zip(rows, outs)]
        write_jsonl_atomic(args.out, out_rows, args.overwrite)
        print(f"wrote {len(out_rows)} responses to {args.out}", file=sys.stderr)
    else:
        print(outs[0]["response"])
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "convert":
            return cmd_convert(args)
        if args.command == "generate":
            return cmd_generate(args)
    except MoguError as e:
        print(f"mogu-jax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mogu-jax: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
