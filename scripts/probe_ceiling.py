"""How far the frozen model's own features carry a router: a logistic probe per layer on the base model's
last-prompt-token hidden state (``mogu_jax.probe``), fitted on a router stage file's rows and scored per kind on an
evaluation prompts file, at the threshold where the safe kinds' mean over-refusal is at most ``--safe-fp``.

    python scripts/probe_ceiling.py --model runs/demo/smollm2 --data runs/demo/data --eval runs/demo/data/dev.jsonl

``--data``: a ``data build`` folder (its ``router.jsonl``) or a router stage file. Prints, per layer from
``--from-layer`` on and for the mean of the layers' logits in ``--mean-layers``, each kind's share flagged
malicious at the probe's own threshold (logit 0), then the must-refuse kinds' shares at the ``--safe-fp``
threshold: what a router reading only these features could refuse at that over-refusal.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def threshold_at(scores: np.ndarray, kinds: np.ndarray, safe: list, max_fp: float) -> float:
    """The lowest score threshold at which the ``safe`` kinds' mean share above it is <= ``max_fp``."""
    for t in np.sort(scores):
        if np.mean([(scores[kinds == k] > t).mean() for k in safe]) <= max_fp:
            return float(t)
    return float(np.max(scores))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a base checkpoint (ours)")
    ap.add_argument("--data", required=True, help="a data build folder or a router stage file: the fit rows")
    ap.add_argument("--eval", required=True, help="an evaluation prompts file ({prompt, kind})")
    ap.add_argument("--safe-fp", type=float, default=0.05)
    ap.add_argument("--from-layer", type=int, default=10)
    ap.add_argument("--mean-layers", default="18-29", help="first-last layer whose logits are averaged")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--show-misses", default=None, metavar="PROBE",
                    help="list the must-refuse prompts that probe ('mean' or a layer number) leaves under the "
                         "--safe-fp threshold")
    args = ap.parse_args(argv)

    from mogu_jax import api
    from mogu_jax import evaluate as E
    from mogu_jax import probe as P

    cfg, params, tok = api.load(args.model, dtype="float32", param_dtype="float32")
    fit = P.load_rows(args.data)
    rows = E.load_prompts(args.eval)
    x_fit = P.last_token_states(cfg, params, tok, [r["prompt"] for r in fit], batch_size=args.batch_size)
    x_eval = P.last_token_states(cfg, params, tok, [r["prompt"] for r in rows], batch_size=args.batch_size)
    kinds = np.array([r["kind"] for r in rows])
    y_eval = np.isin(kinds, sorted(E.MALICIOUS_KINDS)).astype(np.int32)
    logits = P.fit_probes(x_fit, np.array([r["label"] for r in fit]), x_eval, y_eval)["eval_logits"]
    first, last = (int(v) for v in args.mean_layers.split("-"))
    unsafe = [k for k in sorted(set(kinds)) if k in E.MALICIOUS_KINDS]
    safe = [k for k in sorted(set(kinds)) if k not in E.MALICIOUS_KINDS]
    named = [(f"layer {i}", logits[i]) for i in range(args.from_layer, cfg.num_layers)]
    named.append((f"mean {first}-{last}", logits[first:last + 1].mean(axis=0)))
    print(f"flagged malicious (%), at logit 0 | must-refuse kinds at safe over-refusal <= {100 * args.safe_fp:g}%")
    print("probe        " + " ".join(f"{k[:12]:>12s}" for k in safe + unsafe) + " | "
          + " ".join(f"{k[:12]:>12s}" for k in unsafe))
    for name, s in named:
        t = threshold_at(s, kinds, safe, args.safe_fp)
        at0 = " ".join(f"{100 * (s[kinds == k] > 0).mean():12.1f}" for k in safe + unsafe)
        at_t = " ".join(f"{100 * (s[kinds == k] > t).mean():12.1f}" for k in unsafe)
        print(f"{name:12s} {at0} | {at_t}")
    if args.show_misses is not None:
        name, s = named[-1] if args.show_misses == "mean" else named[int(args.show_misses) - args.from_layer]
        t = threshold_at(s, kinds, safe, args.safe_fp)
        print(f"\n{name}: must-refuse prompts under the threshold (logit {t:.2f})")
        for r, v in zip(rows, s):
            if r["kind"] in unsafe and v <= t:
                print(f"  {r['kind']:22s} {v:6.2f}  {r['prompt'][-100:]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
