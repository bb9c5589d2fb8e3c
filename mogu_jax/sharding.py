"""Device meshes and the one table that maps the model's logical axis names to mesh axes.

The same table reaches activations: :func:`activation_sharding` (entered by the train step while it is
traced) makes :func:`constrain` pin the model's activations (batch over ``data`` x ``fsdp``, heads / MLP /
vocab over ``tensor``); outside it :func:`constrain` is the identity (single-device runs, decoding).

Mesh axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with parameters and optimizer
state sharded along it), ``tensor`` (tensor parallelism over heads / MLP / vocab). Every parameter
declares logical axis names (``mogu_jax.model``, ``mogu_jax.mogu``); ``RULES`` says where each goes.
A rule is skipped when its mesh axis is already used by the same array or does not divide the
dimension (then the next rule for that name is tried, else the dimension is replicated).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mogu_jax.config import ModelConfig
from mogu_jax.errors import MoguError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis, in order of preference (a name may appear several times).
RULES: tuple = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("router_hidden", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "fsdp"),
    ("router_hidden", "fsdp"),
    ("vocab", "fsdp"),
    ("layers", None),
    ("length", None),
    ("norm", None),
    ("lora_rank", None),
    ("router_out", None),
    ("head_dim", None),
    ("cache_len", None),
)


def mesh_shape(sizes: Sequence[int] | dict, n_devices: int) -> tuple[int, int, int]:
    """Resolve (data, fsdp, tensor) sizes; one of them may be -1 (fill with the remaining devices)."""
    if isinstance(sizes, dict):
        unknown = set(sizes) - set(MESH_AXES)
        if unknown:
            raise MoguError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
        sizes = [sizes.get(a, 1) for a in MESH_AXES]
    sizes = [int(s) for s in sizes]
    if len(sizes) != 3:
        raise MoguError(f"a mesh needs 3 sizes (data, fsdp, tensor), got {sizes}")
    if sizes.count(-1) > 1:
        raise MoguError(f"at most one mesh axis may be -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise MoguError(f"mesh {sizes}: {n_devices} devices are not a multiple of {known}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise MoguError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {n_devices}")
    return tuple(sizes)


def make_mesh(sizes: Sequence[int] | dict = (-1, 1, 1), devices: Optional[Sequence] = None) -> Mesh:
    """A (data, fsdp, tensor) mesh. Fully given sizes that need fewer devices than there are use the first
    ones (e.g. (1, 1, 1): a single device)."""
    devices = list(devices if devices is not None else jax.devices())
    vals = list(sizes.values()) if isinstance(sizes, dict) else list(sizes)
    if -1 not in vals:
        n = math.prod(int(v) for v in (mesh_shape(sizes, math.prod(int(v) for v in vals))))
        if n < len(devices) and jax.process_count() == 1:
            devices = devices[:n]
    shape = mesh_shape(sizes, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def spec_for(logical: Iterable[Optional[str]], shape: Sequence[int], mesh: Mesh, rules=RULES) -> P:
    """PartitionSpec for one array: flax's rule resolution, then drop mesh axes that do not divide."""
    spec = nn.logical_to_mesh_axes(tuple(logical), rules)
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        kept = []
        size = 1
        for a in axes:
            if dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return P(*out)


def tree_shardings(logical_tree, shape_tree, mesh: Mesh, rules=RULES):
    """NamedSharding pytree from a pytree of logical PartitionSpecs and a matching pytree of shapes."""
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    return jax.tree_util.tree_map(lambda lg, s: NamedSharding(mesh, spec_for(lg, s.shape, mesh, rules)),
                                  logical_tree, shape_tree, is_leaf=is_spec)


def param_logical_axes(cfg: ModelConfig, parts: Iterable[str] = ()) -> dict:
    """Logical axes of a params tree: the base tree, or a MoGU tree {"base", <parts>}."""
    from mogu_jax.model import param_logical_axes as base_axes
    from mogu_jax.mogu import mogu_logical_axes
    base = base_axes(cfg)
    parts = tuple(parts)
    if not parts:
        return base
    m = mogu_logical_axes(cfg)
    return {"base": base, **{p: m[p] for p in parts}}


def param_shardings(cfg: ModelConfig, params, mesh: Mesh, rules=RULES):
    """Shardings for ``params`` (a base tree or a MoGU tree) on ``mesh``."""
    from mogu_jax.model import split_params
    _, parts = split_params(params)
    logical = param_logical_axes(cfg, parts)
    return tree_shardings(logical, params, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ------------------------------------------------------------------------------ activations
_ACTIVE_MESH: contextvars.ContextVar = contextvars.ContextVar("mogu_activation_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Optional[Mesh], rules=RULES):
    """While tracing inside this context, :func:`constrain` pins activations to ``mesh`` by ``rules`` (the one
    table above), and Flax's logical-axis-rules context holds the same table. ``mesh=None``: no-op."""
    if mesh is None or mesh.size == 1:
        yield
        return
    token = _ACTIVE_MESH.set((mesh, rules))
    try:
        with nn.logical_axis_rules(rules):
            yield
    finally:
        _ACTIVE_MESH.reset(token)


def active_mesh() -> Optional[Mesh]:
    """The mesh of the enclosing :func:`activation_sharding`, or None."""
    active = _ACTIVE_MESH.get()
    return active[0] if active is not None else None


def constrain(x, logical: Sequence[Optional[str]]):
    """``x`` constrained to the sharding its logical axes get under the active rules (mesh axes that do not
    divide a dimension are dropped, as for parameters); the identity outside :func:`activation_sharding`."""
    active = _ACTIVE_MESH.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(logical, x.shape, mesh, rules)))


def activation_spec(logical: Sequence[Optional[str]], shape: Sequence[int]) -> Optional[P]:
    """The PartitionSpec :func:`constrain` would give (None outside :func:`activation_sharding`)."""
    active = _ACTIVE_MESH.get()
    if active is None:
        return None
    mesh, rules = active
    return spec_for(logical, shape, mesh, rules)
