"""conftest for vLLM 0.33.0's own ``tests/v1/ec_connector/unit`` suite, copied beside it by scripts/vllm_env.sh.

vLLM's root ``tests/conftest.py`` imports half its test tree and a GPU teardown; these unit tests need only its
two log fixtures, copied verbatim here (vllm-0.33.0/tests/conftest.py, ``temporary_enable_log_propagate`` and
``caplog_vllm``). Tests that need a hub model or an accelerator are deselected by name, each with its reason.
"""

import logging

import pytest

# node id suffix -> why it cannot run on a CPU-only machine without network
CANNOT_RUN_HERE: dict[str, str] = {
    "test_ec_example_connector.py::TestEdgeCases::test_load_nonexistent_cache": (
        "ECExampleConnector loads onto current_platform.device_type, empty without an accelerator "
        "(safetensors: 'device  is invalid' instead of the FileNotFoundError the test expects)"
    ),
}


def pytest_configure(config: pytest.Config) -> None:
    for marker in ("cpu_test", "slow_test", "skip_global_cleanup", "optional"):
        config.addinivalue_line("markers", marker)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    deselected = [item for item in items if any(item.nodeid.endswith(name) for name in CANNOT_RUN_HERE)]
    for item in deselected:
        reason = next(why for name, why in CANNOT_RUN_HERE.items() if item.nodeid.endswith(name))
        print(f"deselected {item.nodeid}: {reason}")
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]


@pytest.fixture()
def temporary_enable_log_propagate(monkeypatch):
    from vllm.logger import DEFAULT_LOGGING_CONFIG

    monkeypatch.setitem(DEFAULT_LOGGING_CONFIG["loggers"]["vllm"], "propagate", True)
    monkeypatch.setattr(logging.getLogger("vllm"), "propagate", True)


@pytest.fixture()
def caplog_vllm(temporary_enable_log_propagate, caplog):
    with caplog.at_level(logging.INFO):
        yield caplog
