"""repopt_jax: RepOptimizer (gradient re-parameterization, Ding et al., ICLR 2023) for JAX.

The public API: the scales of CSLA blocks and their files, the two rules of the paper, the Optax
transforms built on them, and `repopt_jax.csla`: the CSLA surgery, Hyper-Search, scales trees and the Rule
of Initialization for any Flax NNX model (`repopt_jax.linen` for Linen).
"""

import importlib

# The public names, imported on first use (PEP 562): `import repopt_jax` (and `python -m repopt_jax --help`)
# does not pay for jax, optax and flax until one of them is touched.
_LAZY = {
    **dict.fromkeys(("CSLAScales", "ScalesError", "load_scales", "load_torch_scales", "read_torch_state_dict",
                     "save_scales"), "repopt_jax.scales"),
    **dict.fromkeys(("apply_grad_mult", "csla_bias", "csla_init", "exact_adam_direction", "grad_mult"),
                    "repopt_jax.rules"),
    **dict.fromkeys(("flatten_scales", "repopt_adamw", "repopt_masks", "repopt_sgd", "scale_by_repopt_adam"),
                    "repopt_jax.optim"),
    "path_str": "repopt_jax.paths",
    **dict.fromkeys(("NNXTrainState", "nnx_train_step"), "repopt_jax.nnx_step"),
    **dict.fromkeys(("CSLAConv", "csla_model", "hyper_search_model", "merge", "reinit", "scales_of", "scales_tree",
                     "weight_decay_mask"), "repopt_jax.csla"),
}


def __getattr__(name):
  module = _LAZY.get(name)
  if module is None:
    raise AttributeError(f"module 'repopt_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(module), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "CSLAScales", "ScalesError", "load_scales", "load_torch_scales", "read_torch_state_dict", "save_scales",
    "apply_grad_mult", "csla_bias", "csla_init", "exact_adam_direction", "grad_mult",
    "flatten_scales", "repopt_adamw", "repopt_masks", "repopt_sgd", "scale_by_repopt_adam",
    "path_str", "CSLAConv", "csla_model", "hyper_search_model", "merge", "reinit", "scales_of",
    "scales_tree", "weight_decay_mask", "NNXTrainState", "nnx_train_step",
]
