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
