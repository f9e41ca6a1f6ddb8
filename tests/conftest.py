import pytest

import cuflute


def pytest_collection_modifyitems(config, items):
    if cuflute.gpu_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
