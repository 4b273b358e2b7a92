"""RepOpt-VGG in Flax NNX: the network in four modes, its sizes, and the plumbing between models and scales.

```python
from repopt_jax.models import RepOptVGG, VGGConfig, get_arch, ARCHS, MODES, reparam, count_params, flops
model = RepOptVGG('B1', 'target', num_classes=1000, rngs=nnx.Rngs(0))
```
"""

from repopt_jax.models import reparam
from repopt_jax.models.blocks import BranchScale, CSLABlock, RepVGGBlock, TargetBlock
from repopt_jax.models.flops import count_params, flops
from repopt_jax.models.vgg import (ARCHS, HS_INITS, MODES, BlockSpec, ModelError, RepOptVGG, VGGConfig, get_arch,
                                   hs_scale_init)

__all__ = [
    "ARCHS", "HS_INITS", "MODES", "BlockSpec", "BranchScale", "CSLABlock", "ModelError", "RepOptVGG",
    "RepVGGBlock", "TargetBlock", "VGGConfig", "count_params", "flops", "get_arch", "hs_scale_init", "reparam",
]
