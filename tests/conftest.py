"""Test set-up: 8 virtual CPU devices (set before jax is imported) and the `slow` marker."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long end-to-end test, excluded from the default CI "
                          "run (`-m 'not slow'`).")
