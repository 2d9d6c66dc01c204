"""Fixtures shared by the whole suite live in `tests/fixtures/`, one module per part."""

pytest_plugins: list[str] = [
    "tests.fixtures.processes",
    "tests.fixtures.broker",
    "tests.fixtures.nats",
    "tests.fixtures.api_server",
    "tests.fixtures.bridge",
    "tests.fixtures.sdk",
]
