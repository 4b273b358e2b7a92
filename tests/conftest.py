"""Test setup: 8 fake CPU devices for every test (sharding tests use them; others run on device 0)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import contextlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared")
OFFICIAL_SCALES = os.path.abspath(os.path.join(SHARED, "official_scales"))


@contextlib.contextmanager
def x64():
  """Runs the block with float64 enabled, restoring the previous setting."""
  old = jax.config.read("jax_enable_x64")
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", old)


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
  """Parametrises a test over float32 and float64 (x64 enabled for the latter)."""
  if request.param == "float64":
    with x64():
      yield request.param
  else:
    yield request.param


def official_scales_file(name: str) -> str:
  """Path of an official scale file; skips the test when ../shared/official_scales is absent."""
  path = os.path.join(OFFICIAL_SCALES, name)
  if not os.path.exists(path):
    pytest.skip(f"official scale file {name} not present")
  return path
