import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from support.rankpool import close_all  # noqa: E402


def pytest_configure(config):
    # tests/hf/test_transformers5.py runs the HF adapter's tests with another transformers first on sys.path:
    # a run that imports any other release would pass for the wrong reason.
    expected = os.environ.get("TP_FFN_EXPECT_TRANSFORMERS")
    if expected:
        import transformers

        if transformers.__version__ != expected:
            raise pytest.UsageError(
                f"TP_FFN_EXPECT_TRANSFORMERS={expected}, but transformers {transformers.__version__} was imported "
                f"from {transformers.__file__}"
            )


@pytest.fixture(scope="session", autouse=True)
def _close_rank_pools():
    yield
    close_all()
