"""The published MoGU artifacts, in and out (MOGU_SPEC.md section 4).

* glad / unwilling adapters: PEFT LoRA folders (``adapter_config.json`` + ``adapter_model.safetensors``
  or ``.bin``), keys ``base_model.model.<target>.lora_{A,B}.weight`` with ``<target>`` the attention
  output projection of layer i (``model.layers.{i}.self_attn.o_proj``; Falcon
  ``transformer.h.{i}.self_attention.dense``);
* router: a ``torch.save`` dict (or the same keys in .safetensors) with keys
  ``<prefix>routers.{i}.{alpha_,beta_}.linear_{0,1,2}.{weight,bias}`` (``model.``; Falcon ``transformer.``);
  ``alpha_`` is the unwilling head (``a``), ``beta_`` the glad head (``b``).

The names of the published files appear only here. Our layout is described in ``mogu_jax.mogu``.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Optional

import numpy as np

from mogu_jax.config import ModelConfig
from mogu_jax.convert.safetensors_io import SafetensorsFile, write_safetensors
from mogu_jax.convert.table import branch_target, router_prefix
from mogu_jax.errors import MoguError

PEFT_PREFIX = "base_model.model."
# published head name -> our head name;  published linear -> (our weight, our bias)
HEADS = {"alpha_": "unwilling", "beta_": "glad"}
LINEARS = {"linear_0": ("w0", None), "linear_1": ("w1", "b1"), "linear_2": ("w2", "b2")}
# the checkpoints the authors' inference scripts load (resp_unwill / resp_glad / router_layer)
AUTHOR_CHECKPOINTS = {
    "llama2": {"unwilling": 960, "glad": 800, "router": 5920},
    "vicuna": {"unwilling": 2480, "glad": 1120, "router": 5920},
    "falcon": {"unwilling": 2160, "glad": 1120, "router": 5920},
}


# ------------------------------------------------------------------------------------ reading
def _read_tensor_file(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        f = SafetensorsFile(path)
        return {k: f.get(k) for k in f.keys()}
    try:
        import torch
    except ImportError:
        raise MoguError(f"{path} is a PyTorch file: install torch (pip install 'mogu_jax[torch]')") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise MoguError(f"cannot read {path}: {e}") from None
    if not isinstance(sd, dict):
        raise MoguError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    from mogu_jax.convert.sources import _TorchStateDict
    wrapped = _TorchStateDict(sd)
    return {k: wrapped.get(k) for k in sd}


def read_peft_adapter(adapter_dir: str, cfg: ModelConfig, what: str) -> tuple[dict, int, float]:
    """A PEFT LoRA folder -> ({"A": [L, d, r], "B": [L, r, D]}, r, lora_alpha). Validates everything."""
    cpath = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(cpath):
        raise MoguError(f"{what} adapter {adapter_dir}: missing adapter_config.json")
    with open(cpath) as f:
        acfg = json.load(f)
    if str(acfg.get("peft_type", "LORA")).upper() != "LORA":
        raise MoguError(f"{what} adapter {adapter_dir}: peft_type {acfg.get('peft_type')!r} is not LORA")
    r, alpha = int(acfg["r"]), float(acfg.get("lora_alpha", acfg["r"]))
    target_leaf = branch_target(cfg).rsplit(".", 1)[-1]
    targets = acfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    if targets and not any(t == target_leaf or t.endswith("." + target_leaf) for t in targets):
        raise MoguError(f"{what} adapter {adapter_dir} targets {targets}, not the attention output projection "
                        f"({target_leaf!r}) that MoGU adapts")
    wpath = next((os.path.join(adapter_dir, n) for n in ("adapter_model.safetensors", "adapter_model.bin")
                  if os.path.isfile(os.path.join(adapter_dir, n))), None)
    if wpath is None:
        raise MoguError(f"{what} adapter {adapter_dir}: no adapter_model.safetensors or adapter_model.bin")
    tensors = _read_tensor_file(wpath)
    pattern = re.compile("^" + re.escape(PEFT_PREFIX + branch_target(cfg)).replace(r"\{i\}", r"(\d+)")
                         + r"\.lora_(A|B)(?:\.[A-Za-z0-9_]+)?\.weight$")
    found: dict[tuple[int, str], np.ndarray] = {}
    others = []
    for k, v in tensors.items():
        m = pattern.match(k)
        if m:
            found[(int(m.group(1)), m.group(2))] = (k, v)
        else:
            others.append(k)
    if others:
        raise MoguError(f"{what} adapter {adapter_dir} has tensors for other modules, e.g. {sorted(others)[:3]}; "
                        f"MoGU adapters only adapt {PEFT_PREFIX + branch_target(cfg)}")
    layers = sorted({i for i, _ in found})
    extra = [i for i in layers if i >= cfg.num_layers]
    missing = [i for i in range(cfg.num_layers) for ab in "AB" if (i, ab) not in found]
    if extra:
        raise MoguError(f"{what} adapter {adapter_dir} has layers {extra} but the base model has "
                        f"{cfg.num_layers} layers (0..{cfg.num_layers - 1})")
    if missing:
        raise MoguError(f"{what} adapter {adapter_dir} is missing layers {sorted(set(missing))}")
    d_in, d_out = cfg.num_heads * cfg.head_dim, cfg.hidden_size
    A = np.empty((cfg.num_layers, d_in, r), np.float32)
    B = np.empty((cfg.num_layers, r, d_out), np.float32)
    dtype = None
    for i in range(cfg.num_layers):
        for ab, want, dst in (("A", (r, d_in), A), ("B", (d_out, r), B)):
            key, arr = found[(i, ab)]
            if tuple(arr.shape) != want:
                raise MoguError(f"{what} adapter tensor {key} has shape {list(arr.shape)}, expected {list(want)} "
                                f"(r={r} from adapter_config.json, base model width {d_in}); "
                                "is the adapter for another model?")
            if dtype is None:
                dtype = arr.dtype
                if dst.dtype != dtype:
                    A, B = A.astype(dtype), B.astype(dtype)
                    dst = A if ab == "A" else B
            dst[i] = arr.T
    return {"A": A, "B": B}, r, alpha


def read_router(path: str, cfg: ModelConfig, layers: Optional[tuple] = None) -> tuple[dict, tuple, int]:
    """A published router file -> (router params stacked over its layers, layer ids, hidden width).
    ``layers``: the layer ids expected (None = every layer of the base model, as published)."""
    if not os.path.isfile(path):
        raise MoguError(f"router file {path} does not exist")
    tensors = _read_tensor_file(path)
    prefix = router_prefix(cfg)
    pattern = re.compile("^" + re.escape(prefix) + r"routers\.(\d+)\.(alpha_|beta_)\.(linear_[012])\.(weight|bias)$")
    found: dict[tuple, np.ndarray] = {}
    unknown = []
    for k, v in tensors.items():
        m = pattern.match(k)
        if not m or (m.group(3) == "linear_0" and m.group(4) == "bias"):
            unknown.append(k)
        else:
            found[(int(m.group(1)), m.group(2), m.group(3), m.group(4))] = (k, v)
    if unknown:
        raise MoguError(f"router file {path} has unknown keys, e.g. {sorted(unknown)[:3]}; expected "
                        f"{prefix}routers.<layer>.<alpha_|beta_>.linear_<0|1|2>.<weight|bias>")
    file_layers = tuple(sorted({k[0] for k in found}))
    expect = tuple(layers) if layers else tuple(range(cfg.num_layers))
    extra = [i for i in file_layers if i not in expect]
    missing = [i for i in expect if i not in file_layers]
    if extra or missing:
        msg = f"router file {path} has routers for layers {list(file_layers)}"
        if extra:
            msg += f"; not expected: {extra}"
        if missing:
            msg += f"; missing: {missing}"
        msg += f" (base model has {cfg.num_layers} layers; pass --router-layers for a MoGU v2 subset)"
        raise MoguError(msg)
    d_in, d_out = cfg.num_heads * cfg.head_dim, cfg.hidden_size
    w0_key = (expect[0], "alpha_", "linear_0", "weight")
    if w0_key not in found:
        raise MoguError(f"router file {path} is missing {prefix}routers.{expect[0]}.alpha_.linear_0.weight")
    hidden = int(found[w0_key][1].shape[0])
    want = {("linear_0", "weight"): (hidden, d_in), ("linear_1", "weight"): (d_out, hidden),
            ("linear_1", "bias"): (d_out,), ("linear_2", "weight"): (1, d_out), ("linear_2", "bias"): (1,)}
    out: dict = {}
    for pub_head, head in HEADS.items():
        out[head] = {}
        for (lin, kind), shape in want.items():
            stacked = []
            for i in expect:
                key = (i, pub_head, lin, kind)
                name = f"{prefix}routers.{i}.{pub_head}.{lin}.{kind}"
                if key not in found:
                    raise MoguError(f"router file {path} is missing {name}")
                arr = found[key][1]
                if tuple(arr.shape) != shape:
                    raise MoguError(f"router tensor {name} has shape {list(arr.shape)}, expected {list(shape)} "
                                    f"(base model attention width {d_in}, router hidden {hidden})")
                stacked.append(arr.T if kind == "weight" else arr)
            ours = LINEARS[lin][0] if kind == "weight" else LINEARS[lin][1]
            out[head][ours] = np.stack(stacked)
    return out, expect, hidden


def find_released(mogu_dir: str, part: str, number: Optional[int], model: Optional[str]) -> str:
    """Locate a part in the authors' folder layout: resp_glad/<N>_lora, resp_unwill/<N>_lora,
    router_layer/<N>_router.pth. ``number`` None: the authors' choice for ``model`` if known, else the
    only (or highest-numbered) one present."""
    sub, pat = {"glad": ("resp_glad", r"(\d+)_lora$"), "unwilling": ("resp_unwill", r"(\d+)_lora$"),
                "router": ("router_layer", r"(\d+)_router\.(?:pth|pt|bin|safetensors)$")}[part]
    base = os.path.join(mogu_dir, sub)
    if not os.path.isdir(base):
        raise MoguError(f"{mogu_dir} has no {sub}/ folder (expected the released MoGU layout)")
    cands = {}
    for p in glob.glob(os.path.join(base, "*")):
        m = re.search(pat, os.path.basename(p))
        if m:
            cands[int(m.group(1))] = p
    if not cands:
        raise MoguError(f"{base} holds no {'*_lora folders' if part != 'router' else '*_router.pth files'}")
    if number is None and model in AUTHOR_CHECKPOINTS:
        number = AUTHOR_CHECKPOINTS[model][part]
        if number not in cands:
            raise MoguError(f"{base} has no checkpoint {number} (the authors' choice for {model}); present: "
                            f"{sorted(cands)}; pick one with --{part}-step")
    if number is None:
        number = max(cands)
    if number not in cands:
        raise MoguError(f"{base} has no checkpoint {number}; present: {sorted(cands)}")
    return cands[number]


# ------------------------------------------------------------------------------------ writing
def peft_tensors(branch: dict, cfg: ModelConfig) -> list[tuple[str, np.ndarray]]:
    out = []
    for i in range(cfg.num_layers):
        base = PEFT_PREFIX + branch_target(cfg).format(i=i)
        out.append((f"{base}.lora_A.weight", np.ascontiguousarray(np.asarray(branch["A"][i]).T)))
        out.append((f"{base}.lora_B.weight", np.ascontiguousarray(np.asarray(branch["B"][i]).T)))
    return out


def write_peft_adapter(out_dir: str, branch: dict, cfg: ModelConfig, base_model: str = "") -> None:
    """A PEFT LoRA folder (the caller makes ``out_dir`` atomic)."""
    os.makedirs(out_dir, exist_ok=True)
    target = branch_target(cfg).rsplit(".", 1)[-1]
    acfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
        "lora_dropout": 0.0, "target_modules": [target], "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "base_model_name_or_path": base_model, "modules_to_save": None,
        "layers_to_transform": None, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(acfg, f, indent=2)
    tensors = dict(peft_tensors(branch, cfg))
    specs = [(k, v.shape, v.dtype) for k, v in tensors.items()]
    write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"), specs, tensors.__getitem__,
                      {"format": "pt"})


def router_tensors(router: dict, cfg: ModelConfig) -> list[tuple[str, np.ndarray]]:
    prefix = router_prefix(cfg)
    out = []
    for n, i in enumerate(cfg.router_layer_ids):
        for pub_head, head in HEADS.items():
            for lin, (w, b) in LINEARS.items():
                out.append((f"{prefix}routers.{i}.{pub_head}.{lin}.weight",
                            np.ascontiguousarray(np.asarray(router[head][w][n]).T)))
                if b is not None:
                    out.append((f"{prefix}routers.{i}.{pub_head}.{lin}.bias", np.asarray(router[head][b][n])))
    return out


def write_router(path: str, router: dict, cfg: ModelConfig) -> None:
    """``torch.save`` of the published dict (or safetensors when ``path`` ends in .safetensors)."""
    tensors = router_tensors(router, cfg)
    if path.endswith(".safetensors"):
        d = dict(tensors)
        write_safetensors(path, [(k, v.shape, v.dtype) for k, v in tensors], d.__getitem__, {"format": "pt"})
        return
    try:
        import torch
    except ImportError:
        raise MoguError("writing router.pth needs torch (pip install 'mogu_jax[torch]'); "
                        "or name the file *.safetensors") from None
    from mogu_jax.convert.sources import to_torch
    torch.save({k: to_torch(v) for k, v in tensors}, path)
