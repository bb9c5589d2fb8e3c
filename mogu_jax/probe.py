"""Where to put the routers (MoGU v2): a linear probe per layer on the instruction's last-token hidden state.

For every decoder layer ``i`` the probe reads the residual stream after that layer at the last prompt token
(the chat template applied, as generation sees it: the position the answer is generated from), fits a
logistic regression benign (0) vs malicious (1) on the *fit* rows, and scores it on held-out rows. The
layers whose probes separate the two best on held-out rows are where MoGU v2 places its routers:
``mogu-jax train router model.router_layers=top-4:PROBE_DIR`` reads them from ``probe.json``.

Rows come from ``seeds`` (the shipped seed lists' train rows: benign vs malicious; ``seeds+contrast`` adds the
contrast rows, benign prompts with alarming words, to the benign side), a router stage file
(``{"instruction", "output", "label"}`` lines, or a ``data build`` folder holding ``router.jsonl``), or an
evaluation prompts file (``{"prompt", "kind"}``: harmful / jailbreak are malicious, benign / borderline not).
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

import numpy as np

from mogu_jax.errors import MoguError

PROBE_FILE = "probe.json"
PLOT_FILE = "accuracy.png"
FORMAT = "mogu_jax.probe"
VERSION = 1
SEEDS = "seeds"  # the seed lists' train rows: benign vs malicious
SEEDS_CONTRAST = "seeds+contrast"  # the same with the contrast rows (benign, alarming words) on the benign side


# ------------------------------------------------------------------------------------------- rows
def load_rows(spec: str) -> list[dict]:
    """``[{"prompt", "label"}]`` from ``seeds``, a router stage file / data folder, or a prompts file."""
    if spec in (SEEDS, SEEDS_CONTRAST):
        from mogu_jax import synth
        benign = ("benign", "contrast") if spec == SEEDS_CONTRAST else ("benign",)
        return ([{"prompt": r["instruction"], "label": 0} for kind in benign for r in synth.split(kind, "train")]
                + [{"prompt": r["instruction"], "label": 1} for r in synth.split("malicious", "train")])
    if os.path.isdir(spec):
        path = os.path.join(spec, "router.jsonl")
        if not os.path.isfile(path):
            raise MoguError(f"{spec} is a folder without router.jsonl; give a router stage file, a prompts file "
                            "or 'seeds'")
        spec = path
    if not os.path.exists(spec):
        raise MoguError(f"probe data {spec} does not exist; give a router stage file, a prompts file or 'seeds'")
    if _is_router_file(spec):
        from mogu_jax import data as D
        return [{"prompt": r["instruction"], "label": int(r["label"])} for r in D.load_router_jsonl(spec)]
    from mogu_jax import evaluate as E
    return [{"prompt": r["prompt"], "label": int(r["kind"] in E.MALICIOUS_KINDS)} for r in E.load_prompts(spec)]


def _is_router_file(path: str) -> bool:
    """A router stage file's first record has a ``label`` (prompts files have a ``kind``)."""
    if path.lower().endswith((".csv", ".tsv")):
        return False
    try:
        with open(path, encoding="utf-8-sig") as f:
            first = next((ln for ln in f if ln.strip()), "")
    except (OSError, UnicodeDecodeError):
        return False  # the prompts loader reports it
    try:
        rec = json.loads(first)
    except json.JSONDecodeError:
        return '"label"' in first  # a JSON list spread over lines: its first line
    return isinstance(rec, dict) and "label" in rec


def split_rows(labels: Sequence[int], holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) row indices, stratified by label: ``holdout`` of each class (at least one) held out."""
    labels = np.asarray(labels)
    if not 0.0 < holdout < 1.0:
        raise MoguError(f"--holdout must be between 0 and 1, got {holdout}")
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for lab in (0, 1):
        idx = np.flatnonzero(labels == lab)
        name = "malicious" if lab else "benign"
        if len(idx) < 2:
            raise MoguError(f"the probe needs at least 2 {name} rows (one to fit, one to score); the data has "
                            f"{len(idx)}")
        idx = rng.permutation(idx)
        n_held = min(max(int(round(holdout * len(idx))), 1), len(idx) - 1)
        held.append(idx[:n_held])
        fit.append(idx[n_held:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


# ---------------------------------------------------------------------------------- hidden states
def _states_fn(cfg):
    """jitted ``(base, tokens [B,T], kv_mask [B,T], last [B]) -> [L, B, D]``: each layer's output (the residual
    stream after it) at each row's ``last`` position (right-padded rows; causal attention ignores the pad)."""
    import jax
    import jax.numpy as jnp

    from mogu_jax.model import attention_mask, embed, layer_class, positional

    layer = layer_class(cfg)(cfg, "base")

    def run(base, tokens, kv_mask, last):
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = embed(cfg, base["embedding"], tokens)
        cos, sin, bias = positional(cfg, positions, kv_mask)
        mask = attention_mask(cfg, kv_mask, t, 0)

        def body(x, lp):
            x, _ = layer.apply({"params": lp}, x, cos, sin, mask, bias, None, 0, {})
            return x, x[jnp.arange(b), last].astype(jnp.float32)

        return jax.lax.scan(body, x, base["layers"])[1]

    return jax.jit(run)


def last_token_states(cfg, params, tokenizer, prompts: Sequence[str], *, template: Optional[str] = None,
                      system: Optional[str] = None, batch_size: int = 16, max_len: int = 512,
                      progress: bool = False) -> np.ndarray:
    """``[N, L, D]`` float32: every layer's hidden state at the last token of each templated prompt (prompts
    longer than ``max_len`` tokens keep their last ``max_len``)."""
    from mogu_jax.generate import encode_instructions

    ids = [x[-max_len:] for x in encode_instructions(tokenizer, prompts, template, system)]
    return last_token_states_ids(cfg, params, ids, batch_size=batch_size, progress=progress)


def last_token_states_ids(cfg, params, ids: Sequence[Sequence[int]], *, batch_size: int = 16,
                          progress: bool = False) -> np.ndarray:
    """``[N, L, D]`` float32: every layer's hidden state at the last of each row's token ids."""
    from mogu_jax.model import split_params

    base, _ = split_params(params)
    fn = _states_fn(cfg)
    pad = 0
    out = []
    order = np.argsort([len(x) for x in ids], kind="stable")  # similar lengths together: fewer padded tokens
    for start in range(0, len(ids), batch_size):
        rows = [ids[i] for i in order[start:start + batch_size]]
        t = 16 * math.ceil(max(len(r) for r in rows) / 16)  # few distinct shapes: few compiles
        tokens = np.full((batch_size, t), pad, np.int32)
        mask = np.zeros((batch_size, t), bool)
        for j, r in enumerate(rows):
            tokens[j, :len(r)], mask[j, :len(r)] = r, True
        last = np.asarray([len(r) - 1 for r in rows] + [0] * (batch_size - len(rows)), np.int32)
        mask[len(rows):, 0] = True  # filler rows: one valid token, no NaN from an all-masked softmax
        states = np.asarray(fn(base, tokens, mask, last))  # [L, B, D]
        out.append(np.transpose(states[:, :len(rows)], (1, 0, 2)))
        if progress:
            print(f"\r[probe] hidden states {min(start + batch_size, len(ids))}/{len(ids)}", end="", flush=True)
    if progress:
        print(flush=True)
    result = np.empty((len(ids),) + out[0].shape[1:], np.float32)
    result[order] = np.concatenate(out)
    return result


# ------------------------------------------------------------------------------------------ probe
def fit_probes(x_fit: np.ndarray, y_fit: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray, *,
               l2: float = 1e-2, steps: int = 300, lr: float = 0.05) -> dict:
    """One logistic regression per layer (all layers at once), on features standardised with the fit rows'
    mean and std: ``steps`` full-batch Adam steps on the mean log-loss + ``l2/2 |w|^2`` from zero weights
    (deterministic). ``x_*``: ``[N, L, D]``. Returns per-layer ``accuracy`` / ``loss`` on the eval rows and
    ``fit_accuracy``, each ``[L]`` numpy, and ``eval_logits`` ``[L, N]`` (> 0: malicious)."""
    import jax
    import jax.numpy as jnp
    import optax

    mu = x_fit.mean(axis=0, keepdims=True)
    sd = x_fit.std(axis=0, keepdims=True) + 1e-6
    zf = jnp.asarray((x_fit - mu) / sd).transpose(1, 0, 2)  # [L, N, D]
    ze = jnp.asarray((x_eval - mu) / sd).transpose(1, 0, 2)
    yf, ye = jnp.asarray(y_fit, jnp.float32), jnp.asarray(y_eval, jnp.float32)
    n_layers, _, d = zf.shape
    tx = optax.adam(lr)

    def logits(p, z):
        return jnp.einsum("lnd,ld->ln", z, p["w"], precision=jax.lax.Precision.HIGHEST) + p["b"][:, None]

    def layer_losses(p, z, y):  # [L]
        return optax.sigmoid_binary_cross_entropy(logits(p, z), y[None]).mean(axis=1)

    def objective(p):  # layers are independent: the sum's gradient is each layer's own
        return jnp.sum(layer_losses(p, zf, yf)) + 0.5 * l2 * jnp.sum(p["w"] ** 2)

    @jax.jit
    def train():
        p = {"w": jnp.zeros((n_layers, d)), "b": jnp.zeros((n_layers,))}

        def step(carry, _):
            p, s = carry
            g = jax.grad(objective)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (p, tx.init(p)), None, length=steps)[0][0]

    p = train()

    def accuracy(z, y):
        return jnp.mean((logits(p, z) > 0) == (y[None] > 0.5), axis=1)

    return {"accuracy": np.asarray(accuracy(ze, ye)), "loss": np.asarray(layer_losses(p, ze, ye)),
            "fit_accuracy": np.asarray(accuracy(zf, yf)), "eval_logits": np.asarray(logits(p, ze))}


def rank_layers(accuracy: Sequence[float], loss: Sequence[float]) -> list[int]:
    """Layer ids best first: highest held-out accuracy, ties broken by the lower held-out log-loss, then by
    the lower layer id."""
    return sorted(range(len(accuracy)), key=lambda i: (-float(accuracy[i]), float(loss[i]), i))


def top_layers(ranking: Sequence[int], k: int) -> list[int]:
    """The best ``k`` layers of ``ranking``, in layer order (a ``model.router_layers`` list)."""
    if k < 1:
        raise MoguError(f"top-k needs k >= 1, got {k}")
    if k > len(ranking):
        raise MoguError(f"top-{k} asks for more layers than the probe has ({len(ranking)})")
    return sorted(int(i) for i in ranking[:k])


def router_layers_from_probe(path: str, k: int) -> list[int]:
    """The top ``k`` layers of a probe's ``probe.json`` (``path``: the file or its folder)."""
    if os.path.isdir(path):
        path = os.path.join(path, PROBE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise MoguError(f"no probe file {path} (run `mogu-jax probe ... --out DIR` first)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MoguError(f"{path}: not a readable probe file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("ranking"), list):
        raise MoguError(f"{path} is not a probe file written by `mogu-jax probe`")
    return top_layers(doc["ranking"], k)


# ----------------------------------------------------------------------------------------- output
def format_table(result: dict) -> str:
    chosen = set(result["router_layers"])
    lines = [f"mean over {result['settings']['repeats']} splits of {result['n_fit']} fit / {result['n_heldout']} "
             "held-out rows", "layer  held-out acc (sd)  held-out loss  fit acc",
             "-----  -----------------  -------------  -------"]
    for row in result["layers"]:
        mark = "  *" if row["layer"] in chosen else ""
        lines.append(f"{row['layer']:>5}  {row['accuracy']:>9.3f} ({row['accuracy_std']:.3f})  {row['loss']:>13.4f}  "
                     f"{row['fit_accuracy']:>7.3f}{mark}")
    lines.append(f"router_layers: {','.join(str(i) for i in result['router_layers'])}   "
                 f"(top {result['top_k']}; * above)")
    return "\n".join(lines)


def _plot(result: dict, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    layers = [r["layer"] for r in result["layers"]]
    fig = Figure(figsize=(max(5.0, 0.22 * len(layers) + 2), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    acc = np.asarray([r["accuracy"] for r in result["layers"]])
    sd = np.asarray([r["accuracy_std"] for r in result["layers"]])
    ax.plot(layers, acc, marker="o", markersize=3, label="held-out")
    ax.fill_between(layers, acc - sd, np.minimum(acc + sd, 1.0), alpha=0.2, lw=0)
    ax.plot(layers, [r["fit_accuracy"] for r in result["layers"]], ls=":", color="tab:gray", label="fit")
    chosen = result["router_layers"]
    ax.scatter(chosen, [result["layers"][i]["accuracy"] for i in chosen], s=60, facecolors="none",
               edgecolors="tab:red", label=f"top {result['top_k']}", zorder=3)
    ax.axhline(result["chance"], ls="--", color="tab:gray", lw=0.8, label="majority class")
    ax.set_xlabel("layer")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"linear probe, benign vs malicious, last prompt token ({result['n_fit']} fit / "
                 f"{result['n_heldout']} held-out rows, mean of {result['settings']['repeats']} splits)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})


def write_probe(result: dict, out_dir: str, overwrite: bool = False) -> None:
    """``probe.json`` and ``accuracy.png`` into ``out_dir``, atomically."""
    from mogu_jax.io_utils import atomic_dir

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        with open(os.path.join(tmp, PROBE_FILE), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        _plot(result, os.path.join(tmp, PLOT_FILE))


# ---------------------------------------------------------------------------------------- command
def repeated_scores(x: np.ndarray, labels: np.ndarray, holdout: float, seed: int, repeats: int) -> dict:
    """:func:`fit_probes` on ``repeats`` stratified splits (seeds ``seed``, ``seed + 1``, ...): per-layer means of
    held-out accuracy, loss and fit accuracy, and the held-out accuracy's standard deviation over the splits (with
    ~100 held-out rows one row is ~1 point, so a single split ranks close layers by noise)."""
    if repeats < 1:
        raise MoguError(f"--repeats must be >= 1, got {repeats}")
    runs = []
    for r in range(repeats):
        fit, held = split_rows(labels, holdout, seed + r)
        runs.append(fit_probes(x[fit], labels[fit], x[held], labels[held]))
    out = {k: np.mean([run[k] for run in runs], axis=0) for k in ("accuracy", "loss", "fit_accuracy")}
    out["accuracy_std"] = np.std([run["accuracy"] for run in runs], axis=0)
    return out


def run_probe(model: str, data: str, out_dir: str, *, top_k: int = 4, holdout: float = 0.25, seed: int = 0,
              repeats: int = 5, template: Optional[str] = None, system: Optional[str] = None, batch_size: int = 16,
              max_len: int = 512, dtype: str = "float32", overwrite: bool = False, progress: bool = True) -> dict:
    """Load rows and model, probe every layer, write ``probe.json`` + ``accuracy.png``; returns the result."""
    from mogu_jax import api
    from mogu_jax.io_utils import check_output_dir

    check_output_dir(out_dir, overwrite)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MoguError("the probe's plot needs matplotlib: pip install matplotlib") from None
    rows = load_rows(data)
    labels = np.asarray([r["label"] for r in rows])
    fit, held = split_rows(labels, holdout, seed)  # bad data fails before the model loads
    if repeats < 1:
        raise MoguError(f"--repeats must be >= 1, got {repeats}")
    cfg, params, tok = api.load(model, dtype=dtype)
    if tok is None:
        raise MoguError(f"{model} has no tokenizer; the probe needs one")
    if top_k < 1 or top_k > cfg.num_layers:
        raise MoguError(f"--top-k must be between 1 and the model's {cfg.num_layers} layers, got {top_k}")
    x = last_token_states(cfg, params, tok, [r["prompt"] for r in rows], template=template, system=system,
                          batch_size=batch_size, max_len=max_len, progress=progress)
    scores = repeated_scores(x, labels, holdout, seed, repeats)
    ranking = rank_layers(scores["accuracy"], scores["loss"])
    result = {
        "format": FORMAT, "version": VERSION, "model": str(model), "data": str(data),
        "feature": "residual stream after each layer, last prompt token (template applied)",
        "n_fit": int(len(fit)), "n_heldout": int(len(held)),
        "n_malicious": int(labels.sum()), "n_benign": int((labels == 0).sum()),
        "chance": float(max(labels[held].mean(), 1 - labels[held].mean())),
        "settings": {"holdout": holdout, "seed": seed, "repeats": repeats, "template": template, "system": system,
                     "dtype": dtype, "max_len": max_len, "l2": 1e-2, "steps": 300},
        "layers": [{"layer": i, "accuracy": float(scores["accuracy"][i]), "loss": float(scores["loss"][i]),
                    "fit_accuracy": float(scores["fit_accuracy"][i]), "accuracy_std": float(scores["accuracy_std"][i])}
                   for i in range(cfg.num_layers)],
        "ranking": ranking, "top_k": int(top_k), "router_layers": top_layers(ranking, top_k),
    }
    write_probe(result, out_dir, overwrite=overwrite)
    return result
