"""Image-classification data: tfds random-access sources read by grain pipelines, placed on a device mesh.

No TensorFlow is needed. The embedded default dataset, ``digits`` (scikit-learn's 1,797 handwritten 8x8
digits), and ``fashion_mnist`` (from local idx files) are built locally as tfds datasets on first use; stock
tfds datasets (cifar10, cifar100, imagenet2012, ...) are read once prepared in the array_record format.

Example:
  >>> from repopt_jax import data
  >>> spec = data.dataset_info('digits')
  >>> (spec.num_classes, spec.splits['train'], spec.splits['test'])
  (10, 1437, 360)
"""

from repopt_jax.data.local import (ArrayImageBuilder, fashion_mnist_source_dir, load_fashion_mnist_idx,
                                   prepare_local, read_idx)
from repopt_jax.data.pipeline import Stream, global_batch, make_iterator, make_loader, seek
from repopt_jax.data.sources import ExampleReader, open_source
from repopt_jax.data.specs import (AUGMENT_KINDS, DatasetError, DatasetSpec, available_datasets, dataset_info,
                                   default_data_dir)

__all__ = [
    "AUGMENT_KINDS", "ArrayImageBuilder", "DatasetError", "DatasetSpec", "ExampleReader", "Stream",
    "available_datasets", "dataset_info", "default_data_dir", "fashion_mnist_source_dir", "global_batch",
    "load_fashion_mnist_idx", "make_iterator", "make_loader", "open_source", "prepare_local", "read_idx", "seek",
]
