"""mogu_jax: MoGU (Mixture of Glad and Unwilling responders) in JAX/Flax."""

__version__ = "0.1.0"


def _default_jax_platforms() -> None:
    """With libtpu installed (the ``[tpu]`` extra, for ``mogu-jax plan``) on a machine without TPU chips, JAX would
    first try the TPU runtime: warnings on stderr and a slower start. Then JAX_PLATFORMS defaults to what the
    machine has (cpu, or cuda,cpu); an explicit JAX_PLATFORMS always wins. ``plan`` compiles for TPUs either way."""
    import glob
    import importlib.util
    import os
    import sys

    if os.environ.get("JAX_PLATFORMS") or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    if importlib.util.find_spec("libtpu") is None:
        return
    gpu = os.path.exists("/dev/nvidiactl") and any(
        importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    platforms = "cuda,cpu" if gpu else "cpu"
    os.environ["JAX_PLATFORMS"] = platforms
    if "jax" in sys.modules:  # imported before us: set it while no backend is initialised yet
        from jax._src import xla_bridge

        if not xla_bridge._backends:
            sys.modules["jax"].config.update("jax_platforms", platforms)


_default_jax_platforms()

from mogu_jax.errors import MoguError  # noqa: E402
from mogu_jax.config import ModelConfig  # noqa: E402

__all__ = ["MoguError", "ModelConfig", "__version__"]
