"""Root conftest: the test equipment fixtures live in tests/support (see fixtures.py)."""

pytest_plugins = ["tests.support.fixtures"]
