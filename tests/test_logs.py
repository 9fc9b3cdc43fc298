"""The daemon's log as an operator reads it (`kubectl logs`, Cloud Logging): one JSON
object per line on stdout, whoever logged it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# A process of its own: google-api-core sets up its loggers once per process, when the
# first client is made, and pytest's own capture would sit in front of the handler.
_LOGS_A_LIBRARY_WARNING = """
import logging
import sys
from gannet import clients, logs
from gannet.settings import Settings

def client():
    clients.pubsub_clients(Settings(pubsub_emulator_host="127.0.0.1:1"))

if sys.argv[1] == "a client first":
    client()
logs.configure("INFO")
if sys.argv[1] == "configured first":
    client()
logging.getLogger("google.api_core.bidi").warning("Background thread did not exit.")
logging.getLogger("gannet.daemon").info("gannet stopped")
"""


@pytest.mark.parametrize("order", ["configured first", "a client first"])
def test_a_client_librarys_warning_is_a_json_line_like_the_daemons_own(order):
    """Made after the logs were configured (as the daemon does) or before (a command
    that makes a client first), the Pub/Sub client took the Google libraries' records
    away from the daemon's handler: their warnings (here api_core's, when a stream's
    thread does not stop) went to stderr as bare text, which Cloud Logging files
    without the warning's severity, logger or time."""
    out = subprocess.run(
        [sys.executable, "-c", _LOGS_A_LIBRARY_WARNING, order],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stderr == ""
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(e["severity"], e["logger"], e["message"]) for e in lines] == [
        ("WARNING", "google.api_core.bidi", "Background thread did not exit."),
        ("INFO", "gannet.daemon", "gannet stopped"),
    ]
