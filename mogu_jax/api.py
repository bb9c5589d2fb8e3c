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

from mogu_jax.checkpoint import is_checkpoint, load_checkpoint, load_tokenizer, read_meta, save_checkpoint
from mogu_jax.config import ModelConfig, as_dtype
from mogu_jax.convert.hf import export_hf, params_from_source
from mogu_jax.convert.sources import open_source
from mogu_jax.errors import MoguError
from mogu_jax.io_utils import check_output_dir
from mogu_jax.model import apply, init_cache, init_params  # noqa: F401  (re-exported)


def load(path: str | os.PathLike, dtype: str = "float32", param_dtype: Optional[str] = None,
         progress: bool = False, **cfg_overrides):
    """Load one of our checkpoints, an HF folder, a .gguf file or ``smollm2`` -> (cfg, params, tokenizer).

    ``dtype`` is the compute dtype (float32 or bfloat16); ``param_dtype`` casts the weights
    (None keeps what the checkpoint stores)."""
    path = os.fspath(path)
    overrides = dict(dtype=dtype, **cfg_overrides)
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    cast = as_dtype(param_dtype) if param_dtype is not None else None
    if os.path.isdir(path) and is_checkpoint(path):
        cfg, params, _ = load_checkpoint(path, cast=cast, **overrides)
        return cfg, params, load_tokenizer(path)
    source = open_source(path)
    cfg = ModelConfig.from_hf(source.hf_config(), **overrides)
    params = params_from_source(source, cfg, dtype=cast, finish=lambda _, a: jnp.asarray(a), progress=progress)
    return cfg, params, source.tokenizer()


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
