import pytest

import cuflute


def pytest_collection_modifyitems(config, items):
    if cuflute.gpu_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tuned_table_file(tmp_path, monkeypatch):
    """write(gpu_name, entries): a tuned table for that GPU holding the YAML flow mappings
    ``entries`` (one a line), which the dispatcher reads for the rest of the test."""
    from cuflute import dispatch

    def write(gpu_name: str, entries: list[str]) -> None:
        (tmp_path / f"{dispatch.gpu_slug(gpu_name)}.yaml").write_text(
            f"gpu: {gpu_name}\nentries:\n" + "".join(f"- {e}\n" for e in entries))
        monkeypatch.setenv("CUFLUTE_TUNING_DIR", str(tmp_path))
        dispatch.tuned_table.cache_clear()

    yield write
    dispatch.tuned_table.cache_clear()
