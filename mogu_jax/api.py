"""The Python API for research: load anything into ``(cfg, params, tokenizer)``, a pure ``apply`` and
``generate``, and the conversions the CLI exposes.

    from mogu_jax import api
    cfg, params, tok = api.load("smollm2")            # or an HF folder, a .gguf, one of our checkpoints
    logits, _ = api.apply(cfg, params, tokens)        # pure: jax.grad / jax.vmap / jax.jit all apply
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mogu_jax.checkpoint import (is_checkpoint, load_checkpoint, load_tokenizer, looks_like_checkpoint,
                                 read_meta, save_checkpoint)
from mogu_jax.config import ModelConfig, as_dtype
from mogu_jax.convert.hf import export_hf, params_from_source
from mogu_jax.convert.sources import open_source
from mogu_jax.errors import MoguError
from mogu_jax.io_utils import check_output_dir
from mogu_jax.model import apply, init_cache, init_params  # noqa: F401  (re-exported)


def load(path: str | os.PathLike, dtype: str = "float32", param_dtype: Optional[str] = None,
         progress: bool = False, **cfg_overrides):
    """Load one of our checkpoints, an HF folder, a .gguf file or ``smollm2`` -> (cfg, params, tokenizer).

    ``dtype`` is the compute dtype (float32, bfloat16, or ``auto``: :func:`mogu_jax.precision.resolve_dtype`);
    ``param_dtype`` casts the weights (None keeps what the checkpoint stores; ``auto``: bf16 when the compute
    dtype is bf16, else as stored)."""
    path = os.fspath(path)
    ours = os.path.isdir(path) and (is_checkpoint(path) or looks_like_checkpoint(path))
    source = None if ours else open_source(path)  # a bad path is reported before anything else is said
    dtype, param_dtype = resolve_dtypes(dtype, param_dtype)
    overrides = dict(dtype=dtype, **cfg_overrides)
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    cast = as_dtype(param_dtype) if param_dtype is not None else None
    if ours:
        cfg, params, _ = load_checkpoint(path, cast=cast, **overrides)
        return cfg, params, load_tokenizer(path)
    cfg = ModelConfig.from_hf(source.hf_config(), **overrides)
    params = params_from_source(source, cfg, dtype=cast, finish=lambda _, a: jnp.asarray(a), progress=progress)
    return cfg, params, source.tokenizer()


def resolve_dtypes(dtype, param_dtype=None) -> tuple[str, Optional[str]]:
    """(compute dtype, weights dtype) with ``auto`` resolved: weights follow a bf16 compute dtype (half the
    bytes per decoded token, no cast per step), and stay as stored under fp32."""
    from mogu_jax.precision import is_auto, resolve_dtype

    dtype = resolve_dtype(dtype)
    if param_dtype is not None and is_auto(param_dtype):
        param_dtype = "bfloat16" if as_dtype(dtype) == jnp.bfloat16 else None
    return dtype, param_dtype


def convert_hf_to_jax(src: str, out_dir: str, overwrite: bool = False, dtype: Optional[str] = None,
                      progress: bool = False) -> str:
    """HF folder / .gguf / smollm2 -> our checkpoint folder (atomic; refuses a different existing one)."""
    source = open_source(src)
    cfg = ModelConfig.from_hf(source.hf_config())
    fp = source.fingerprint()

    def same(d):
        try:
            return read_meta(d).get("source_fingerprint") == fp
        except MoguError:
            return False

    if check_output_dir(out_dir, overwrite, same):
        return out_dir  # already converted from this very source
    cast = as_dtype(dtype) if dtype else None
    if cast is not None:
        cfg = cfg.replace(param_dtype=str(np.dtype(cast)))
    params = params_from_source(source, cfg, dtype=cast, finish=lambda _, a: jnp.asarray(a), progress=progress)
    tok = source.tokenizer()
    save_checkpoint(out_dir, cfg, params, source.hf_config(), tokenizer=tok,
                    generation_config=source.generation_config(), fingerprint=fp, overwrite=overwrite)
    return out_dir


def convert_jax_to_hf(ckpt_dir: str, out_dir: str, overwrite: bool = False, progress: bool = False,
                      max_shard_bytes: int = 5 * 1024**3) -> str:
    """Our checkpoint folder -> an HF folder that ``AutoModelForCausalLM.from_pretrained`` loads."""
    check_output_dir(out_dir, overwrite)
    cfg, params, meta = load_checkpoint(ckpt_dir)
    params = jax.tree_util.tree_map(np.asarray, params)
    return export_hf(params, cfg, meta["hf_config"], out_dir, tokenizer=load_tokenizer(ckpt_dir),
                     generation_config=meta.get("generation_config"), overwrite=overwrite,
                     max_shard_bytes=max_shard_bytes, progress=progress)


# ------------------------------------------------------------------------------------ MoGU artifacts
def load_mogu_parts(cfg: ModelConfig, glad: Optional[str] = None, unwilling: Optional[str] = None,
                    router: Optional[str] = None, router_layers=None) -> tuple[ModelConfig, dict]:
    """Read published MoGU artifacts (PEFT folders, router file) for a base model of config ``cfg``.
    Returns the config with rank / alpha / router width / router layers set, and the parts as numpy."""
    from mogu_jax.convert import mogu_artifacts as art

    parts: dict = {}
    ranks = {}
    for name, path in (("glad", glad), ("unwilling", unwilling)):
        if path is None:
            continue
        if not os.path.isdir(path):
            raise MoguError(f"{name} adapter {path} is not a directory")
        parts[name], r, alpha = art.read_peft_adapter(path, cfg, name)
        ranks[name] = (r, alpha)
    if len(ranks) == 2 and ranks["glad"] != ranks["unwilling"]:
        raise MoguError(f"rank mismatch: glad adapter has r={ranks['glad'][0]}, lora_alpha={ranks['glad'][1]}, "
                        f"unwilling adapter r={ranks['unwilling'][0]}, lora_alpha={ranks['unwilling'][1]}; "
                        "MoGU needs both branches of one rank and scaling")
    if ranks:
        r, alpha = next(iter(ranks.values()))
        cfg = cfg.replace(lora_rank=r, lora_alpha=alpha)
    if router is not None:
        layers = tuple(router_layers) if router_layers else None
        parts["router"], ids, hidden = art.read_router(router, cfg, layers)
        cfg = cfg.replace(router_hidden=hidden,
                          router_layers=() if ids == tuple(range(cfg.num_layers)) else ids)
    return cfg, parts


def convert_mogu_to_jax(base: str, out_dir: str, glad: Optional[str] = None, unwilling: Optional[str] = None,
                        router: Optional[str] = None, mogu_dir: Optional[str] = None, steps: Optional[dict] = None,
                        release: Optional[str] = None, router_layers=None, overwrite: bool = False,
                        progress: bool = False) -> str:
    """Base model (HF folder / .gguf / smollm2 / our checkpoint) + published MoGU artifacts -> our checkpoint.

    ``mogu_dir``: the released layout (resp_glad/<N>_lora, resp_unwill/<N>_lora, router_layer/<N>_router.pth);
    ``steps`` picks N per part, else the authors' choice for ``release`` (llama2 / vicuna / falcon), else the
    highest present. Everything is read and validated before anything is written."""
    from mogu_jax.convert import mogu_artifacts as art

    check_output_dir(out_dir, overwrite)
    steps = steps or {}
    if mogu_dir is not None:
        glad = glad or art.find_released(mogu_dir, "glad", steps.get("glad"), release)
        unwilling = unwilling or art.find_released(mogu_dir, "unwilling", steps.get("unwilling"), release)
        router = router or art.find_released(mogu_dir, "router", steps.get("router"), release)
    if not (glad or unwilling or router):
        raise MoguError("nothing to convert: give --glad, --unwilling and/or --router, or --mogu-dir")
    if os.path.isdir(base) and is_checkpoint(base):
        cfg, params, meta = load_checkpoint(base)
        hf_config, tok, gen = meta["hf_config"], load_tokenizer(base), meta.get("generation_config")
        base_params, _ = _split(params)
    else:
        source = open_source(base)
        cfg = ModelConfig.from_hf(source.hf_config())
        base_params = params_from_source(source, cfg, finish=lambda _, a: jnp.asarray(a), progress=progress)
        hf_config, tok, gen = source.hf_config(), source.tokenizer(), source.generation_config()
    cfg, parts = load_mogu_parts(cfg, glad, unwilling, router, router_layers)
    parts = jax.tree_util.tree_map(jnp.asarray, parts)
    save_checkpoint(out_dir, cfg, {"base": base_params, **parts}, hf_config, tokenizer=tok,
                    generation_config=gen, overwrite=overwrite)
    return out_dir


def convert_jax_to_mogu(ckpt_dir: str, out_dir: str, overwrite: bool = False, base_model_name: str = "") -> str:
    """Our MoGU checkpoint -> ``glad/`` and ``unwilling/`` PEFT folders and ``router.pth`` (published names)."""
    from mogu_jax.convert import mogu_artifacts as art
    from mogu_jax.io_utils import atomic_dir

    check_output_dir(out_dir, overwrite)
    cfg, params, meta = load_checkpoint(ckpt_dir)
    _, parts = _split(params)
    if not parts:
        raise MoguError(f"{ckpt_dir} holds no MoGU parts (glad / unwilling / router) to export")
    parts = jax.tree_util.tree_map(np.asarray, parts)
    name = base_model_name or meta.get("hf_config", {}).get("_name_or_path", "")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for branch in ("glad", "unwilling"):
            if branch in parts:
                art.write_peft_adapter(os.path.join(tmp, branch), parts[branch], cfg, name)
        if "router" in parts:
            art.write_router(os.path.join(tmp, "router.pth"), parts["router"], cfg)
    return out_dir


def _split(params):
    from mogu_jax.model import split_params
    return split_params(params)
