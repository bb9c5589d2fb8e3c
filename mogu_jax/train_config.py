"""Training configuration: YAML files in ``configs/`` plus ``key=value`` overrides, validated against one
schema of defaults. An unknown key is an error that names it and suggests the closest known key.

Sections: ``model``, ``inputs`` (the glad / unwilling branches the router stage builds on), ``data``,
``optim``, ``train``, ``checkpoint``, ``mesh``, ``distributed``, ``output``, and ``per_stage`` whose
``glad`` / ``unwilling`` / ``router`` entries override the others for that stage (the published
hyper-parameters differ per stage).
"""

from __future__ import annotations

import copy
import difflib
import os
from typing import Any, Optional, Sequence

import yaml

from mogu_jax.errors import MoguError

STAGES = ("glad", "unwilling", "router")

DEFAULTS: dict = {
    "model": {
        "base": None,  # HF folder, .gguf, smollm2 or one of our checkpoints
        "dtype": "float32",  # compute dtype (bfloat16: bf16 matmuls, fp32 accumulation)
        "param_dtype": None,  # cast the frozen base weights (None: as stored)
        "trainable_dtype": "float32",  # the trained subtree (master weights) and its optimizer state
        "remat": False,
        "remat_policy": "nothing",  # with remat: nothing | dots (keep the weight matmuls' outputs: less recompute)
        "scan_layers": True,  # nn.scan over layers; false: unrolled (faster steps on CPU, longer compile)
        "attention": "auto",  # auto | xla (reference einsum) | cudnn (GPU) | splash (TPU Pallas kernel)
        # the base's config.json fields (architecture only): lets `mogu-jax plan` build the model without weights
        "architecture": None,
        "template": None,  # llama2-chat | vicuna | falcon | None (tokenizer chat template)
        "system": None,
        "lora_rank": 8,
        "lora_alpha": 16.0,
        "router_hidden": 512,
        "router_layers": None,  # None: every layer (MoGU); a list: MoGU v2 subset
    },
    "inputs": {"glad": None, "unwilling": None},  # for the router stage: stage output dirs or PEFT folders
    "data": {
        "glad": {"affirm": None, "reject": None, "jsonl": None},
        "unwilling": {"affirm": None, "reject": None, "jsonl": None},
        "router": {"normal": None, "label": None, "jsonl": None},
        "max_len": 1024,
        "buckets": [64, 128, 256, 512, 1024],
        "shuffle": True,
        "group_batches": 8,  # batches per window sorted by length before cutting batches (1: no grouping)
        "balance_labels": False,  # router stage: every batch gets the labels in the data's proportion
    },
    "optim": {
        "lr": 5e-5,
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1e-6,
        "weight_decay": 0.0,
        "schedule": "constant",  # constant | linear | cosine (after warmup)
        "warmup_steps": 0,
        "clip_norm": None,
    },
    "train": {
        "epochs": 1.0,
        "max_steps": None,  # optimizer updates; None: epochs decide
        "batch_size": 8,  # examples per micro-batch (global, over all processes)
        "grad_accum": 1,  # micro-batches per optimizer update
        "examples_per_update": None,  # if set: grad_accum = examples_per_update / batch_size
        "seed": 0,
        "router_lambda": 2.0,
        # run the tokens every example starts with (the chat template's system prompt) once per batch, not once
        # per row: the same loss and gradients, less work (StageData.shared_prefix)
        "share_prefix": True,
        "log_every": 1,
    },
    "checkpoint": {"every": 100, "keep": 3},
    "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
    "distributed": {"coordinator": None, "num_processes": None, "process_id": None, "local_devices": None},
    "output": {"dir": None, "tensorboard": True},
    "per_stage": {"glad": {}, "unwilling": {}, "router": {}},
}

# Keys whose value is a free-form mapping or list (not validated key by key).
_LEAF_DICTS = {("per_stage", s) for s in STAGES}


def _all_keys(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.append(key)
        if isinstance(v, dict) and v and (tuple(key.split(".")) not in _LEAF_DICTS):
            out += _all_keys(v, key + ".")
    return out


def _unknown(key: str) -> MoguError:
    close = difflib.get_close_matches(key, _all_keys(DEFAULTS), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return MoguError(f"unknown config key {key!r}{hint}")


def _merge(base: dict, over: dict, schema: dict, prefix: str = "") -> None:
    for k, v in over.items():
        key = f"{prefix}{k}"
        if k not in schema:
            raise _unknown(key)
        if isinstance(schema[k], dict) and tuple(key.split(".")) not in _LEAF_DICTS and schema[k]:
            if not isinstance(v, dict):
                raise MoguError(f"config key {key!r} is a section; give it a mapping, not {v!r}")
            _merge(base[k], v, schema[k], key + ".")
        elif tuple(key.split(".")) in _LEAF_DICTS:
            if not isinstance(v, dict):
                raise MoguError(f"config key {key!r} takes a mapping of overrides")
            check = copy.deepcopy(DEFAULTS)
            _merge(check, v, {kk: vv for kk, vv in DEFAULTS.items() if kk != "per_stage"}, "")
            base[k] = copy.deepcopy(v)
        else:
            base[k] = v


def _merge_layer(cfg: dict, data: dict) -> None:
    """Merge one YAML layer; per_stage sections merge stage by stage (later layers add to earlier ones)."""
    per = data.pop("per_stage", None)
    _merge(cfg, data, DEFAULTS)
    if per is not None:
        if not isinstance(per, dict):
            raise MoguError("config key 'per_stage' takes a mapping of stage -> overrides")
        for st, over in per.items():
            if st not in STAGES:
                raise _unknown(f"per_stage.{st}")
            layered = copy.deepcopy(cfg["per_stage"].get(st) or {})
            _deep_update(layered, over or {})
            _merge(cfg["per_stage"], {st: layered}, DEFAULTS["per_stage"], "per_stage.")


def _deep_update(a: dict, b: dict) -> None:
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            _deep_update(a[k], v)
        else:
            a[k] = v


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node, schema = tree, DEFAULTS
    for i, p in enumerate(parts):
        if not isinstance(schema, dict) or p not in schema:
            raise _unknown(dotted)
        if i == len(parts) - 1:
            if isinstance(schema[p], dict) and schema[p] and not isinstance(value, dict):
                raise MoguError(f"config key {dotted!r} is a section, not a value")
            node[p] = value
        else:
            node = node.setdefault(p, {})
            schema = schema[p]


def load_config(stage: str, path=None, overrides: Sequence[str] = ()) -> dict:
    """Defaults <- YAML file(s) (later files win) <- ``key=value`` overrides; then the stage's
    ``per_stage`` section applies (command-line overrides still win)."""
    if stage not in STAGES:
        raise MoguError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    cfg = copy.deepcopy(DEFAULTS)
    for path in ([path] if isinstance(path, str) else list(path or [])):
        if not os.path.isfile(path):
            raise MoguError(f"config file {path} does not exist")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise MoguError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise MoguError(f"config file {path} must hold a mapping")
        _merge_layer(cfg, data)
    for item in overrides:
        if "=" not in item:
            raise MoguError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        _set_dotted(cfg, key.strip(), _parse_value(value))
    # the stage's own section wins over the common one
    stage_over = cfg["per_stage"].get(stage) or {}
    resolved = copy.deepcopy(cfg)
    _merge(resolved, stage_over, {k: v for k, v in DEFAULTS.items() if k != "per_stage"})
    # explicit command-line overrides win over per_stage
    for item in overrides:
        key, value = item.split("=", 1)
        if not key.strip().startswith("per_stage."):
            _set_dotted(resolved, key.strip(), _parse_value(value))
    t = resolved["train"]
    if t.get("examples_per_update"):
        n, b = int(t["examples_per_update"]), int(t["batch_size"])
        if n % b:
            raise MoguError(f"train.examples_per_update={n} is not a multiple of train.batch_size={b}")
        t["grad_accum"] = n // b
    resolved["stage"] = stage
    return resolved
