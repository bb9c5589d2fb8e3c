"""Test setup: 8 simulated CPU devices (set before jax is imported) and shared tiny-model builders."""

import os

# 8 simulated devices share 2 cores with a second test worker: a device thread can reach an in-process
# collective long after the others, and XLA:CPU then aborts the process (its default rendezvous timeout); a
# crash seen once in CI, in a sharded training test. Allow 30 minutes.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_collective_timeout_seconds=1800 --xla_cpu_collective_call_terminate_timeout_seconds=1800")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# `dtype: auto` (the CLI's and training's default) would pick bf16 on a CPU with bf16 units and fp32 on one
# without: the suite pins it to fp32 so every test computes the same numbers on every CPU (test_precision.py
# unsets it to test the choice itself).
os.environ.setdefault("MOGU_JAX_AUTO_DTYPE", "float32")

import pytest  # noqa: E402


def _memory_maps() -> int:
    """The process's memory mappings (Linux; 0 where /proc is not there)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def _max_memory_maps() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530  # Linux's default


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Every compiled XLA:CPU program that JAX's caches keep holds a few memory mappings; the whole suite in one
    process (``pytest -n 0``) reached Linux's limit (vm.max_map_count, 65530 by default) at about 85% of its tests,
    and XLA's next compilation then died with a segmentation fault. After a test module, once the process holds
    a third of that limit, drop the compiled programs (JAX's caches and the decoding's own): later modules
    compile what they need again."""
    yield
    if _memory_maps() > _max_memory_maps() // 3:
        import jax

        from mogu_jax import generate

        generate.clear_caches()
        jax.clear_caches()
