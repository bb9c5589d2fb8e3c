"""Hugging Face <-> mogu_jax parameter conversion, both directions through ``table.rules_for``.

A rule maps one Hugging Face tensor to one or more of our parameters (``rule.paths``; several for a
fused tensor such as Falcon's ``query_key_value``, split on import and joined back on export).

Import streams one source tensor at a time into the (stacked) parameter it belongs to; each
finished parameter is handed to ``finish`` (e.g. moved to device) before the next is built,
so peak memory is one copy of the model plus one stacked parameter. Export streams one
tensor at a time into safetensors shards.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Callable, Iterator, Optional

import jax
import numpy as np
from tqdm.auto import tqdm

from mogu_jax.config import ModelConfig
from mogu_jax.convert.safetensors_io import plan_shards, tensor_nbytes, write_safetensors
from mogu_jax.convert.sources import TensorSource
from mogu_jax.convert.table import ignored, rules_for
from mogu_jax.errors import MoguError
from mogu_jax.io_utils import atomic_dir


def _expected_shapes(cfg: ModelConfig) -> dict[tuple, tuple]:
    from mogu_jax.model import abstract_params
    import flax.linen as nn
    tree = nn.meta.unbox(abstract_params(cfg))
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def params_from_source(source: TensorSource, cfg: ModelConfig, dtype=None,
                       finish: Optional[Callable[[tuple, np.ndarray], object]] = None,
                       progress: bool = False) -> dict:
    """Build our parameter pytree from ``source``. ``dtype`` None keeps the source dtype (bit-exact);
    ``finish(path, array)`` may convert each completed parameter (default: keep numpy)."""
    expected = _expected_shapes(cfg)
    rules = rules_for(cfg)
    available = set(source.keys())
    used: set[str] = set()
    params: dict = {}
    n_layers = cfg.num_layers
    it = tqdm(rules, desc="convert", unit="param", disable=not progress)
    for rule in it:
        for path in rule.paths:
            if path not in expected:
                raise AssertionError(f"conversion table names unknown parameter {path}")
        fulls = [expected[path] for path in rule.paths]
        hf_shape = rule.hf_shape([f[1:] if rule.per_layer else f for f in fulls])
        keys = [rule.hf_key(i) for i in range(n_layers)] if rule.per_layer else [rule.hf_key()]
        outs = [None] * len(fulls)
        for idx, key in enumerate(keys):
            if key not in available:
                raise MoguError(f"tensor {key} is missing from {source.description}")
            got = tuple(source.shape(key))
            if got != hf_shape:
                raise MoguError(f"tensor {key} has shape {list(got)}, expected {list(hf_shape)} "
                                f"for this config ({source.description})")
            for n, arr in enumerate(rule.to_ours(source.get(key))):
                if dtype is not None:
                    arr = arr.astype(dtype)
                if not rule.per_layer:
                    outs[n] = arr
                else:
                    if outs[n] is None:
                        outs[n] = np.empty(fulls[n], arr.dtype)
                    outs[n][idx] = arr
            used.add(key)
        for path, out in zip(rule.paths, outs):
            _set(params, path, finish(path, out) if finish else out)
        del outs
    extra = sorted(k for k in available - used if not ignored(k, cfg))
    if extra:
        warnings.warn(f"{len(extra)} tensors in {source.description} are not used by the "
                      f"{cfg.model_type} table, e.g. {extra[:3]}", stacklevel=2)
    return params


def hf_tensor_specs(params: dict, cfg: ModelConfig) -> list[tuple[str, tuple, np.dtype, object, Optional[int]]]:
    """(hf_name, hf_shape, dtype, rule, layer) for every exported tensor, in table order."""
    specs = []
    for rule in rules_for(cfg):
        arrs = [_get(params, path) for path in rule.paths]
        dtypes = {np.dtype(a.dtype) for a in arrs}
        if len(dtypes) != 1:
            raise MoguError(f"{rule.hf} joins parameters of different dtypes {sorted(map(str, dtypes))}")
        dt = dtypes.pop()
        if rule.per_layer:
            shape = rule.hf_shape([tuple(a.shape[1:]) for a in arrs])
            for i in range(cfg.num_layers):
                specs.append((rule.hf_key(i), shape, dt, rule, i))
        else:
            specs.append((rule.hf_key(), rule.hf_shape([tuple(a.shape) for a in arrs]), dt, rule, None))
    return specs


def hf_tensor(params: dict, rule, layer: Optional[int]) -> np.ndarray:
    arrs = [_get(params, path) for path in rule.paths]
    return rule.to_hf([np.asarray(a[layer] if layer is not None else a) for a in arrs])


def export_hf(params: dict, cfg: ModelConfig, hf_config: dict, out_dir: str, tokenizer=None,
              generation_config: Optional[dict] = None, overwrite: bool = False,
              max_shard_bytes: int = 5 * 1024**3, progress: bool = False) -> str:
    """Write a Hugging Face model folder (config.json, safetensors shards + index) atomically."""
    specs = hf_tensor_specs(params, cfg)
    by_name = {s[0]: s for s in specs}
    shards = plan_shards([(s[0], s[1], s[2]) for s in specs], max_shard_bytes)
    bar = tqdm(total=len(specs), desc="export", unit="tensor", disable=not progress)

    def produce(name):
        _, _, _, rule, layer = by_name[name]
        bar.update(1)
        return hf_tensor(params, rule, layer)

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        if generation_config:
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump(generation_config, f, indent=2)
        meta = {"format": "pt"}
        if len(shards) == 1:
            write_safetensors(os.path.join(tmp, "model.safetensors"), shards[0], produce, meta)
        else:
            weight_map = {}
            total = 0
            for n, shard in enumerate(shards, 1):
                fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(os.path.join(tmp, fname), shard, produce, meta)
                for name, shape, dt in shard:
                    weight_map[name] = fname
                    total += tensor_nbytes(shape, dt)
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    bar.close()
    return out_dir


def iter_hf_state(params: dict, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(hf_name, array) pairs, one at a time: e.g. to feed a PyTorch model's load_state_dict."""
    for name, _, _, rule, layer in hf_tensor_specs(params, cfg):
        yield name, hf_tensor(params, rule, layer)


def params_from_torch(model, cfg: Optional[ModelConfig] = None, dtype=None):
    """(cfg, params as jax arrays) from an in-memory transformers model, through the same table."""
    import jax.numpy as jnp

    from mogu_jax.convert.sources import StateDictSource
    src = StateDictSource(model)
    cfg = cfg or ModelConfig.from_hf(src.hf_config())
    return cfg, params_from_source(src, cfg, dtype=dtype, finish=lambda _, a: jnp.asarray(a))
