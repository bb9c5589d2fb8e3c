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
import math
import os
import re
from typing import Any, Optional, Sequence

import yaml

from mogu_jax.errors import MoguError

STAGES = ("glad", "unwilling", "router")

DEFAULTS: dict = {
    "model": {
        "base": None,  # HF folder, .gguf, smollm2 or one of our checkpoints
        # compute dtype: auto (bf16 where the hardware multiplies bf16 natively, else fp32: mogu_jax.precision),
        # float32 or bfloat16 (bf16 matmuls, fp32 accumulation)
        "dtype": "auto",
        "param_dtype": None,  # cast the frozen base weights (None: as stored; auto: bf16 under bf16 compute)
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
        # None: every layer (MoGU); MoGU v2 subset: a list, "3,5,7", or "top-K:PROBE_DIR" (the probe's best K layers)
        "router_layers": None,
    },
    # for the router stage: stage output dirs, MoGU checkpoints or PEFT folders; or "fresh" for a branch that
    # train.router_trains trains: a new adapter (B = 0: it adds nothing at first), so its own stage is not needed
    "inputs": {"glad": None, "unwilling": None},
    "data": {
        "glad": {"affirm": None, "reject": None, "jsonl": None},
        "unwilling": {"affirm": None, "reject": None, "jsonl": None},
        "router": {"normal": None, "label": None, "jsonl": None},
        "max_len": 1024,
        "buckets": [64, 128, 256, 512, 1024],
        "shuffle": True,
        "group_batches": 8,  # batches per window sorted by length before cutting batches (1: no grouping)
        "balance_labels": False,  # router stage: every batch gets the labels in the data's proportion
        # router stage: null (every example weighs 1) or balanced (each label weighs the same in the loss)
        "label_weights": None,
        "refusal_eos": False,  # append EOS to refusal targets (pairs' refusal, router label-1 output); off = published
        # the LM head on each row's response window only, where that is narrower than the positions from the
        # shortest prompt on (the same loss, less work; mogu_jax.data.loss_window_width)
        "loss_windows": True,
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
        # the parts the router stage trains: [router] (published v1: branches frozen) or with glad and/or unwilling
        # (MoGU v2's joint training; the branches start from inputs.glad / inputs.unwilling and are exported too)
        "router_trains": ["router"],
        # run the tokens every example starts with (the chat template's system prompt) once per batch, not once
        # per row: the same loss and gradients, less work (StageData.shared_prefix)
        "share_prefix": True,
        # router stage with routers only from layer k up (branches frozen): the layers below run once per
        # example, not once per epoch (the same loss and gradients; host memory: examples x tokens x hidden x 4 B)
        "cache_frozen_layers": True,
        # router stage: the tokens the routers' targets cover: all (published) or after_prefix (not the tokens every
        # example starts with: the chat template's system prompt, the same for both labels, which no router can
        # tell apart since it comes before the instruction), or prompt (after_prefix without the response past its
        # first token: the positions routed decoding reads), or prompt_end (of the prompt only its last 8 positions,
        # which have read the whole instruction, and the first response token)
        "router_targets": "all",
        "log_every": 1,
    },
    "checkpoint": {"every": 100, "keep": 3},
    "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
    "distributed": {"coordinator": None, "num_processes": None, "process_id": None, "local_devices": None},
    "output": {"dir": None, "tensorboard": True},
    "per_stage": {"glad": {}, "unwilling": {}, "router": {}},
    # `mogu-jax demo` only (configs/smollm2-135m.yaml): the generation around the three stages; training
    # ignores it
    "demo": {
        # the base model's answers for the stage files; wrap_every, twins, borderline_train, unsafe_twins,
        # malicious_train: synth.build_data's (null / false: none)
        "data": {"max_new_tokens": 40, "batch_size": 32, "wrap_every": None, "twins": False,
                 "borderline_train": False, "unsafe_twins": False, "malicious_train": False},
        # base vs MoGU on the evaluation split; the MoGU checkpoint's routed decoding: routed_tokens (-1: every
        # token), handoff (fixed | router, see mogu_jax.generate.RouterGatedHandoff) and its threshold
        "eval": {"max_new_tokens": 40, "batch_size": 32, "routed_tokens": -1, "handoff": "fixed",
                 "handoff_threshold": 0.2},
        "quick": {"limit": 8, "max_new_tokens": 16, "max_len": 64, "per_kind": 2, "epochs": 1},  # --quick
    },
}

# Numeric keys: (int or float, lowest value, lowest excluded, highest value or None, None allowed). Each is
# checked after the layers are merged: a finite number in range, or the config is refused naming the key.
NUMERIC: dict = {
    "model.lora_rank": (int, 1, False, None, False),
    "model.lora_alpha": (float, 0, True, None, False),
    "model.router_hidden": (int, 1, False, None, False),
    "data.max_len": (int, 1, False, None, False),
    "data.group_batches": (int, 1, False, None, False),
    "optim.lr": (float, 0, False, None, False),
    "optim.b1": (float, 0, False, 1, False),
    "optim.b2": (float, 0, False, 1, False),
    "optim.eps": (float, 0, False, None, False),
    "optim.weight_decay": (float, 0, False, None, False),
    "optim.warmup_steps": (int, 0, False, None, False),
    "optim.clip_norm": (float, 0, True, None, True),
    "train.epochs": (float, 0, True, None, False),
    "train.max_steps": (int, 1, False, None, True),
    "train.batch_size": (int, 1, False, None, False),
    "train.grad_accum": (int, 1, False, None, False),
    "train.examples_per_update": (int, 1, False, None, True),
    "train.seed": (int, 0, False, None, False),
    "train.router_lambda": (float, 0, False, None, False),
    "train.log_every": (int, 1, False, None, False),
    "checkpoint.every": (int, 1, False, None, False),
    "checkpoint.keep": (int, 1, False, None, False),
    "mesh.data": (int, -1, False, None, False),
    "mesh.fsdp": (int, -1, False, None, False),  # -1: the devices the other axes leave
    "mesh.tensor": (int, -1, False, None, False),
}


def check_numbers(conf: dict) -> None:
    """Every key of :data:`NUMERIC` holds a finite number in its range (numeric strings such as YAML's
    ``1e-4`` are converted in place); NaN, inf, text or an out-of-range value is refused, naming the key."""
    for key, (kind, low, low_open, high, optional) in NUMERIC.items():
        section, name = key.split(".")
        value = conf[section].get(name)
        if value is None and optional:
            continue
        wanted = (f"{'an integer' if kind is int else 'a finite number'} {'>' if low_open else '>='} {low:g}"
                  + (f" and <= {high:g}" if high is not None else "") + (" (or null)" if optional else ""))
        number = _as_number(value)
        if number is None or not math.isfinite(number) or (number <= low if low_open else number < low) or (
                high is not None and number > high) or (kind is int and number != int(number)):
            raise MoguError(f"config key {key!r} must be {wanted}, got {value!r}")
        conf[section][name] = int(number) if kind is int else float(number)


def _as_number(value) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


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


# YAML 1.1 (PyYAML) reads 1e-4 as a string (it wants 1.0e-4); an override means the number
_EXPONENT_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _parse_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


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


def read_yaml(path: str) -> dict:
    """A config file's mapping (one clear error for a missing, unreadable, binary or non-mapping file)."""
    from mogu_jax.io_utils import read_text_file

    text = read_text_file(path, "a YAML config file")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise MoguError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise MoguError(f"config file {path} must hold a mapping")
    return data


def read_config_file(path: str, stage: str) -> dict:
    """One YAML layer as a mapping. A run's own resolved ``config.yaml`` (written into its output folder, with a
    top-level ``stage`` key) is accepted for that stage, without its ``per_stage`` section (already applied);
    for another stage it is an error, since its values are resolved for the stage it ran."""
    data = read_yaml(path)
    if "stage" in data:
        ran = data.pop("stage")
        if ran != stage:
            raise MoguError(f"config file {path} is the resolved config of a {ran!r} run (its 'stage' key); "
                            f"it configures `train {ran}`, not `train {stage}`")
        # its values already include its per_stage section and the run's command-line overrides (which won
        # over per_stage): applying per_stage again would undo those overrides
        data.pop("per_stage", None)
    return data


def _dotted(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """A nested mapping of settings -> (dotted key, value) pairs (a schema section's leaves)."""
    out = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        node = DEFAULTS
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(v, dict) and isinstance(node, dict) and node and tuple(key.split(".")) not in _LEAF_DICTS:
            out += _dotted(v, key + ".")
        else:
            out.append((key, v))
    return out


def load_config(stage: str, path=None, overrides: Sequence[str] = (), values: Optional[dict] = None) -> dict:
    """Defaults <- YAML files or mappings (later ones win) <- ``key=value`` overrides and ``values`` (a nested
    mapping of typed settings, as code passes them); then the stage's ``per_stage`` section applies (the
    overrides and ``values`` still win)."""
    if stage not in STAGES:
        raise MoguError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    cfg = copy.deepcopy(DEFAULTS)
    for layer in ([path] if isinstance(path, (str, dict)) else list(path or [])):
        _merge_layer(cfg, copy.deepcopy(layer) if isinstance(layer, dict) else read_config_file(layer, stage))
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise MoguError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        pairs.append((key.strip(), _parse_value(value)))
    pairs += _dotted(values or {})
    for key, value in pairs:
        _set_dotted(cfg, key, value)
    # the stage's own section wins over the common one
    stage_over = cfg["per_stage"].get(stage) or {}
    resolved = copy.deepcopy(cfg)
    _merge(resolved, stage_over, {k: v for k, v in DEFAULTS.items() if k != "per_stage"})
    # explicit overrides win over per_stage
    for key, value in pairs:
        if not key.startswith("per_stage."):
            _set_dotted(resolved, key, value)
    check_numbers(resolved)
    t = resolved["train"]
    if t.get("examples_per_update"):
        n, b = int(t["examples_per_update"]), int(t["batch_size"])
        if n % b:
            raise MoguError(f"train.examples_per_update={n} is not a multiple of train.batch_size={b}")
        t["grad_accum"] = n // b
    resolved["model"]["router_layers"] = resolve_router_layers(resolved["model"]["router_layers"])
    resolved["train"]["router_trains"] = resolve_router_trains(resolved["train"]["router_trains"])
    if stage == "router":
        check_fresh_inputs(resolved)
    resolved["stage"] = stage
    return resolved


FRESH = "fresh"  # inputs.glad / inputs.unwilling: a new branch, trained only in the router stage


def check_fresh_inputs(conf: dict) -> None:
    """A ``fresh`` branch is only meaningful when the router stage trains it (else it would stay zero)."""
    for part in conf["inputs"]:
        if conf["inputs"][part] == FRESH and part not in conf["train"]["router_trains"]:
            raise MoguError(f"inputs.{part}: fresh (a new {part} branch) needs train.router_trains to include "
                            f"{part}; routers only would keep it at zero")


ROUTER_TRAINABLE = ("router", "glad", "unwilling")  # what train.router_trains may list


def resolve_router_trains(value: Any) -> list:
    """``train.router_trains`` as a list of parts in canonical order (router, glad, unwilling): a list or
    ``"router,glad"``; it must include ``router``, other parts are the branches the router stage trains too."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise MoguError(f"train.router_trains takes a list of parts ({', '.join(ROUTER_TRAINABLE)}), got {value!r}")
    names = [n.strip() for n in names]
    unknown = [n for n in names if n not in ROUTER_TRAINABLE]
    if unknown:
        raise MoguError(f"train.router_trains: unknown part {unknown[0]!r}; parts: {', '.join(ROUTER_TRAINABLE)}")
    if "router" not in names:
        raise MoguError("train.router_trains must include router (the router stage trains the routers)")
    if len(set(names)) != len(names):
        raise MoguError(f"train.router_trains lists a part twice: {value!r}")
    return [p for p in ROUTER_TRAINABLE if p in names]


def resolve_router_layers(value: Any) -> Optional[list]:
    """``model.router_layers`` as a sorted list of layer ids (None: every layer). Accepts a list, one id,
    ``"3,5,7"``, or ``"top-K:PROBE"``: the K best layers of a ``mogu-jax probe`` output (folder or probe.json)."""
    if value is None or value == [] or value == "":
        return None
    if isinstance(value, str):
        m = re.fullmatch(r"\s*top-(\d+):(.+)", value)
        if m:
            from mogu_jax.probe import router_layers_from_probe
            return router_layers_from_probe(m.group(2).strip(), int(m.group(1)))
        try:
            value = [int(v) for v in value.split(",")]
        except ValueError:
            raise MoguError(f"model.router_layers takes layer ids (a list or '3,5,7') or 'top-K:PROBE_DIR', got "
                            f"{value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise MoguError(f"model.router_layers takes a list of layer ids, got {value!r}")
    if any(v < 0 for v in value) or len(set(value)) != len(value):
        raise MoguError(f"model.router_layers: layer ids must be distinct and >= 0, got {value!r}")
    return sorted(value)
