"""``dtype: auto``: bf16 compute where the backend multiplies bf16 natively, else fp32.

* **TPU**: bf16 (the MXU multiplies bf16 natively).
* **GPU**: bf16 on chips with bf16 tensor cores (NVIDIA compute capability >= 8.0, AMD MI200 and newer), else fp32.
* **CPU**: a short probe times the same mixed-precision matmul the model runs (bf16 x bf16 -> fp32,
  :mod:`mogu_jax.numerics`) against a true fp32 matmul (1024^3, best of a few, well under a second with the
  compiles). bf16 is chosen only when it is at least :data:`MIN_SPEEDUP` times faster: CPUs with AMX or
  AVX512-BF16 run it 2-4x the fp32 rate, AVX2-only CPUs (e.g. AMD Zen 3) run it *slower* than fp32, since XLA
  then emulates bf16 with conversions. The verdict is cached per machine in ``precision_probe.json`` under the
  cache folder (``$MOGU_JAX_CACHE``, else ``$XDG_CACHE_HOME/mogu_jax``, else ``~/.cache/mogu_jax``), keyed by
  the CPU model and the jaxlib version, so a different CPU (or a new jaxlib) probes again.

An explicit dtype (``float32``, ``bfloat16``, ``float64``) is never second-guessed; ``$MOGU_JAX_AUTO_DTYPE``
(``float32`` or ``bfloat16``) fixes what ``auto`` means without probing (a site policy; the test suite pins fp32). :func:`resolve_dtype`
prints the choice and its reason once per process.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Callable, NamedTuple, Optional

AUTO = "auto"
MIN_SPEEDUP = 1.25  # bf16 must beat fp32 by this factor: the casts and fp32 parts of a step eat a smaller edge
PROBE_SIZE = 1024
CACHE_FILE = "precision_probe.json"
FORCE_ENV = "MOGU_JAX_AUTO_DTYPE"  # float32 | bfloat16: what auto resolves to, without a probe (site policy, tests)


class Choice(NamedTuple):
    dtype: str  # "float32" or "bfloat16"
    reason: str


_said: set = set()


def is_auto(dtype) -> bool:
    return dtype is None or str(dtype).lower() == AUTO


def resolve_dtype(dtype, *, say: Optional[Callable[[str], None]] = None) -> str:
    """``dtype`` itself unless it is ``auto`` (or None); then the backend's verdict (:func:`auto_choice`),
    announced once per process through ``say`` (default: a line on stdout; errors alone go to stderr)."""
    if not is_auto(dtype):
        return str(dtype)
    choice = auto_choice()
    if os.environ.get(FORCE_ENV, "").strip():
        return choice.dtype  # pinned on purpose, like an explicit dtype: nothing to announce
    line = f"mogu-jax: dtype auto -> {choice.dtype} ({choice.reason}); pass --dtype / model.dtype to override"
    if choice.dtype not in _said:  # once per process (a later answer from the cache says the same)
        _said.add(choice.dtype)
        (say or (lambda s: print(s, flush=True)))(line)
    return choice.dtype


def auto_choice() -> Choice:
    import jax

    forced = os.environ.get(FORCE_ENV, "").strip().lower()
    if forced:
        if forced not in ("float32", "bfloat16"):
            from mogu_jax.errors import MoguError
            raise MoguError(f"{FORCE_ENV}={forced!r}: use float32 or bfloat16")
        return Choice(forced, f"{FORCE_ENV} says so")

    backend = jax.default_backend()
    if backend == "tpu":
        return Choice("bfloat16", "TPU: the MXU multiplies bf16 natively")
    if backend in ("gpu", "cuda", "rocm"):
        return _gpu_choice(jax.devices()[0])
    return cpu_choice()


def _gpu_choice(device) -> Choice:
    cc = getattr(device, "compute_capability", None)
    kind = getattr(device, "device_kind", "GPU")
    try:
        major = int(str(cc).split(".")[0]) if cc is not None else None
    except ValueError:
        major = None
    if major is not None and major >= 8:
        return Choice("bfloat16", f"{kind} (compute capability {cc}) has bf16 tensor cores")
    if major is None and "MI" in str(kind).upper():
        return Choice("bfloat16", f"{kind}: bf16 matrix cores")
    return Choice("float32", f"{kind} (compute capability {cc}) has no bf16 tensor cores")


# --------------------------------------------------------------------------------------------- CPU probe
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cache_key() -> str:
    import jaxlib

    return f"{cpu_model()} | jaxlib {jaxlib.__version__}"


def cache_dir() -> str:
    if os.environ.get("MOGU_JAX_CACHE"):
        return os.environ["MOGU_JAX_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mogu_jax")


def cpu_choice() -> Choice:
    """The cached verdict for this CPU model and jaxlib, or a fresh probe (then cached)."""
    key = cache_key()
    path = os.path.join(cache_dir(), CACHE_FILE)
    cached = _read_cache(path).get(key)
    if cached:
        return _verdict(cached["bf16_speedup"], cached_at=path)
    speedup = measure_bf16_speedup()
    _write_cache(path, key, {"bf16_speedup": speedup, "probe": f"{PROBE_SIZE}^3 matmul", "time": time.time()})
    return _verdict(speedup)


def _verdict(speedup: float, cached_at: Optional[str] = None) -> Choice:
    where = f"cached in {cached_at}" if cached_at else "probed now"
    what = (f"CPU {cpu_model()!r}: a bf16 x bf16 -> fp32 matmul runs {speedup:.2f}x the fp32 rate ({where})")
    if speedup >= MIN_SPEEDUP:
        return Choice("bfloat16", what)
    return Choice("float32", what + f"; bf16 needs >= {MIN_SPEEDUP}x to pay")


def measure_bf16_speedup(n: int = PROBE_SIZE, repeats: int = 3) -> float:
    """fp32 time / bf16 time of an n^3 matmul, each the model's own kernel (best of ``repeats``, interleaved)."""
    import jax
    import jax.numpy as jnp

    def f32(a, b):
        return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)

    def bf16(a, b):
        return jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    fns = [jax.jit(f32), jax.jit(bf16)]
    best = [float("inf"), float("inf")]
    for fn in fns:
        fn(a, b).block_until_ready()  # compile
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn(a, b).block_until_ready()
            best[i] = min(best[i], time.perf_counter() - t)
    return round(best[0] / best[1], 3)


def _read_cache(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache yet, or an unreadable one: probe again


def _write_cache(path: str, key: str, entry: dict) -> None:
    data = _read_cache(path)
    data[key] = entry
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the probe simply runs again next time
