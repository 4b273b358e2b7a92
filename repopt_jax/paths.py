"""Parameter paths: the one way the package names a parameter (`'layer1/0/conv1/kernel'`).

Every module that matches parameters by name (the optimizers' scales trees, `repopt_jax.csla`, the
weight-decay mask, quantization) goes through `path_str`, so a scales file written from one of them is read
by all the others. A path is the `'/'`-joined keys from the root: attribute names, dict keys and list
indices, exactly as `jax.tree_util.keystr(path, simple=True, separator='/')` writes a pytree key path, with
an NNX `Variable`'s trailing `.value` dropped (so `nnx.state(model)` and its pure dict name a kernel alike).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

__all__ = ["path_str", "join"]


def _is_pytree_key(k) -> bool:
  return isinstance(k, (jax.tree_util.DictKey, jax.tree_util.GetAttrKey, jax.tree_util.SequenceKey,
                        jax.tree_util.FlattenedIndexKey))


def path_str(path: Sequence[Any]) -> str:
  """`'stages/0/conv/kernel'` for a pytree key path or an NNX graph path (a tuple of names and indices).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path({'a': [jnp.ones(1)]})[0]]
    ['a/0']
    >>> path_str(('trunk', 0, 'kernel', 'kernel'))
    'trunk/0/kernel/kernel'
  """
  path = tuple(path)
  # A Variable flattens to its `.value`: that attribute is not part of the parameter's name.
  while path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  if all(_is_pytree_key(k) for k in path):
    return jax.tree_util.keystr(path, simple=True, separator="/")
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def join(*parts) -> str:
  """`join('layer1/0', 'conv1', 'kernel') == 'layer1/0/conv1/kernel'` (empty parts skipped)."""
  return "/".join(str(p) for p in parts if str(p) != "")
