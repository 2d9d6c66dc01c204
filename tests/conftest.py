"""Fixtures shared by the whole suite live in `tests/fixtures/`, one module per part."""

import signal

# A test run started in the background of a script (`make test &`, CI runners) inherits
# SIGINT ignored, and so would every program the tests start: Python then installs no
# KeyboardInterrupt handler and Ctrl-C, which tests send as a user would, does nothing
# (the README example's test failed so). Programs start as from a terminal instead.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

pytest_plugins: list[str] = [
    "tests.fixtures.processes",
    "tests.fixtures.broker",
    "tests.fixtures.nats",
    "tests.fixtures.api_server",
    "tests.fixtures.bridge",
    "tests.fixtures.sdk",
]
