"""repopt_jax: RepOptimizer (gradient re-parameterization, Ding et al., ICLR 2023) for JAX.

The public API: the scales of CSLA blocks and their files, the two rules of the paper, and the Optax
transforms built on them.
"""

from repopt_jax.scales import (CSLAScales, ScalesError, load_scales, load_torch_scales, read_torch_state_dict,
                               save_scales)
from repopt_jax.rules import apply_grad_mult, csla_init, exact_adam_direction, grad_mult
from repopt_jax.optim import (flatten_scales, repopt_adamw, repopt_masks, repopt_sgd, scale_by_repopt_adam)

__version__ = "0.1.0"

__all__ = [
    "CSLAScales", "ScalesError", "load_scales", "load_torch_scales", "read_torch_state_dict", "save_scales",
    "apply_grad_mult", "csla_init", "exact_adam_direction", "grad_mult",
    "flatten_scales", "repopt_adamw", "repopt_masks", "repopt_sgd", "scale_by_repopt_adam",
]
