"""Write a split's benign seed rows inside the seed jailbreak templates as an evaluation prompts file (kind
``jailbreak_benign``: should be answered). ``dev.jsonl`` of ``mogu-jax data build`` already holds the dev rows;
this writes them for any split, e.g. to evaluate an older run's checkpoint on them.

    python scripts/wrapped_benign_prompts.py --split dev --out runs/dev_jb_benign.jsonl
    mogu-jax eval RUN/mogu --prompts runs/dev_jb_benign.jsonl --out runs/report-dev-jb-benign
"""

from __future__ import annotations

import argparse
import sys

from mogu_jax import synth
from mogu_jax.errors import MoguError
from mogu_jax.io_utils import write_jsonl_atomic


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", choices=synth.SPLIT_PARTS, default="dev")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    rows = synth.wrapped_benign_prompts(args.split)
    try:
        write_jsonl_atomic(args.out, rows, overwrite=args.overwrite)
    except MoguError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(rows)} prompts to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
