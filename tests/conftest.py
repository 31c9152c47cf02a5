"""Shared test configuration: hypothesis profiles and the CUDA marker.

HYPOTHESIS_PROFILE=ci (default) is derandomized so CI is reproducible;
HYPOTHESIS_PROFILE=thorough explores many more examples.
"""
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=40,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _cuda_usable():
    try:
        import longattn

        return longattn.cuda_available()
    except Exception:
        return False


CUDA_USABLE = _cuda_usable()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and the CUDA backend; skipped otherwise")


def pytest_collection_modifyitems(config, items):
    if CUDA_USABLE:
        return
    skip = pytest.mark.skip(reason="no CUDA GPU or longattn built without CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
