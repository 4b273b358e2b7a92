"""The models: RepOpt-VGG in Flax NNX (four modes, its sizes, the plumbing between models and scales), a CIFAR
ResNet-18, and the registry of every `model.arch` name (`available_archs()`; non-VGG models go through the
generic `repopt_jax.csla` machinery).

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
from repopt_jax.models.resnet import BasicBlock, ResNetCifar, resnet18_cifar
from repopt_jax.models.ghostnet import RepOptGhostNet
from repopt_jax.models.registry import GENERIC_ARCHS, available_archs, build, build_generic, family, register_arch

__all__ = [
    "ARCHS", "HS_INITS", "MODES", "BlockSpec", "BranchScale", "CSLABlock", "ModelError", "RepOptVGG",
    "RepVGGBlock", "TargetBlock", "VGGConfig", "count_params", "flops", "get_arch", "hs_scale_init", "reparam",
    "BasicBlock", "ResNetCifar", "resnet18_cifar", "GENERIC_ARCHS", "available_archs", "build", "build_generic",
    "family", "register_arch", "RepOptGhostNet",
]
