"""MoGU router weights per prompt row: validation (:func:`check_router`) and their summary per kind for the
report (:func:`router_summary`): mean ``a`` (unwilling weight) and ``b`` (glad weight), the share of rows with
``b > a``, and per-layer means."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from mogu_jax.errors import MoguError

ROUTER_KEYS = ("mean_a", "mean_b", "layer_a", "layer_b")


def check_router(router: Optional[Mapping[str, Any]], n: int) -> Optional[dict[str, np.ndarray]]:
    """Router data -> float64 arrays: mean_a/mean_b [n], layer_a/layer_b [n, L] (means derived from layers)."""
    if router is None:
        return None
    if not isinstance(router, Mapping):
        raise MoguError(f"router must be a dict with keys from {', '.join(ROUTER_KEYS)}")
    unknown = sorted(set(router) - set(ROUTER_KEYS))
    if unknown:
        raise MoguError(f"unknown router key(s) {', '.join(map(str, unknown))}; keys: {', '.join(ROUTER_KEYS)}")
    out: dict[str, np.ndarray] = {}
    for key in ROUTER_KEYS:
        if router.get(key) is None:
            continue
        try:
            arr = np.asarray(router[key], dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise MoguError(f"router {key}: not a numeric array: {e}") from None
        want = 1 if key.startswith("mean") else 2
        if key.startswith("mean") and arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != want or arr.shape[0] != n:
            shape = "[rows]" if want == 1 else "[rows, layers]"
            raise MoguError(f"router {key}: expected shape {shape} with {n} rows, got {list(arr.shape)}")
        if want == 2 and arr.shape[1] < 1:
            raise MoguError(f"router {key}: no layers")
        if not np.all(np.isfinite(arr)):
            raise MoguError(f"router {key}: contains NaN or infinite values")
        if np.any(arr < 0) or np.any(arr > 1):
            raise MoguError(f"router {key}: values must be sigmoid outputs in [0, 1] (got {arr.min():g} .. "
                            f"{arr.max():g})")
        out[key] = arr
    if ("layer_a" in out) != ("layer_b" in out):
        raise MoguError("router: give both layer_a and layer_b, or neither")
    if "layer_a" in out and out["layer_a"].shape != out["layer_b"].shape:
        raise MoguError(f"router: layer_a {list(out['layer_a'].shape)} and layer_b {list(out['layer_b'].shape)} "
                        "differ in shape")
    for ab in "ab":
        if f"mean_{ab}" not in out:
            if f"layer_{ab}" not in out:
                raise MoguError(f"router: needs mean_{ab} or layer_{ab}")
            out[f"mean_{ab}"] = out[f"layer_{ab}"].mean(axis=1)
    return out




def router_summary(r: Mapping[str, np.ndarray], by_kind: Mapping[str, list[int]]) -> dict:
    """The report's router section from checked router data (:func:`check_router`) and the row indices of
    each kind."""
    summary = {"n_layers": int(r["layer_a"].shape[1]) if "layer_a" in r else None,
               "mean_a": {}, "mean_b": {}, "b_gt_a_rate": {}, "layer_a": {}, "layer_b": {}}
    for k, idx in by_kind.items():
        a, b = r["mean_a"][idx], r["mean_b"][idx]
        summary["mean_a"][k] = float(a.mean())
        summary["mean_b"][k] = float(b.mean())
        summary["b_gt_a_rate"][k] = int(np.sum(b > a)) / len(idx) if len(idx) else 0.0
        if "layer_a" in r:
            summary["layer_a"][k] = [float(x) for x in r["layer_a"][idx].mean(axis=0)]
            summary["layer_b"][k] = [float(x) for x in r["layer_b"][idx].mean(axis=0)]
    if "layer_a" not in r:
        summary["layer_a"] = summary["layer_b"] = None
    return summary
