"""mogu_jax: MoGU (Mixture of Glad and Unwilling responders) in JAX/Flax."""

__version__ = "0.1.0"

from mogu_jax.errors import MoguError  # noqa: E402
from mogu_jax.config import ModelConfig  # noqa: E402

__all__ = ["MoguError", "ModelConfig", "__version__"]
