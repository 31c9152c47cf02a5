"""Shared test configuration: hypothesis profiles and the CUDA markers.

HYPOTHESIS_PROFILE=ci (default) is derandomized so CI is reproducible;
HYPOTHESIS_PROFILE=thorough explores many more examples.

LONGATTN_TEST_DEVICE (default "cuda") is the device the `cuda`-marked tests run on.
LONGATTN_TEST_DEVICE=cpu is a dry run of their test logic on the CPU backend: the `cuda`
tests run without a GPU, except those also marked `cuda_only` (their subject is CUDA
itself: streams, CUDA-only limits and errors), which are skipped.
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
TEST_DEVICE = os.environ.get("LONGATTN_TEST_DEVICE", "cuda")
if TEST_DEVICE not in ("cuda", "cpu"):
    raise ValueError(f"LONGATTN_TEST_DEVICE must be 'cuda' or 'cpu', not {TEST_DEVICE!r}")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and the CUDA backend; skipped otherwise")
    config.addinivalue_line("markers", "cuda_only: a cuda test that cannot dry-run on the CPU "
                                       "(LONGATTN_TEST_DEVICE=cpu skips it)")


def pytest_collection_modifyitems(config, items):
    if TEST_DEVICE == "cpu":
        skip = pytest.mark.skip(reason="needs a real GPU (dry run on CPU)")
        for item in items:
            if item.get_closest_marker("cuda") and item.get_closest_marker("cuda_only"):
                item.add_marker(skip)
        return
    if CUDA_USABLE:
        return
    skip = pytest.mark.skip(reason="no CUDA GPU or longattn built without CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
