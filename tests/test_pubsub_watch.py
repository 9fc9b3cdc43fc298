"""gannet.pubsub_watch against the Pub/Sub emulator behind a relay that goes away."""

from __future__ import annotations

import logging
import time

from conftest import Started, pubsub_at

from gannet import clients
from gannet.dev.local_services import free_port
from gannet.metrics import Metrics
from gannet.pubsub_watch import PubSubWatch
from gannet.subscriber import Subscriber


def test_pubsub_out_of_reach_is_said_once_and_its_return_too(stack, caplog):
    """The client library reopens a broken stream on its own, silently: with Pub/Sub out
    of reach a pod wrote no line and stayed ready while the backlog grew. The watch's
    call fails, and says so once (not at every look), with what to check; the time of
    Pub/Sub's last answer stays where it was; its return is said too."""
    port = free_port()
    through = pubsub_at(stack, port)
    subscriber = Subscriber(
        clients.pubsub_clients(through)[1], stack.settings.subscription_path(), 4, print
    )
    metrics = Metrics()
    watch = PubSubWatch(subscriber.ask, metrics.pubsub_last_reached, ask_timeout_s=3.0)
    relay = Started("gannet.dev.relay", str(stack.services.ports.pubsub), port=port)
    watch.check()
    reached = metrics.registry.get_sample_value("gannet_pubsub_last_reached_timestamp_seconds")
    assert reached and watch.down_since is None
    relay.stop()
    caplog.set_level(logging.INFO, logger="gannet.pubsub_watch")
    watch.check()
    watch.check()
    said = [r for r in caplog.records if r.name == "gannet.pubsub_watch"]
    assert [r.levelname for r in said] == ["ERROR"], "once per outage, not at every look"
    assert "Pub/Sub does not answer" in said[0].getMessage()
    assert "egress to pubsub.googleapis.com" in said[0].getMessage()
    assert (
        metrics.registry.get_sample_value("gannet_pubsub_last_reached_timestamp_seconds") == reached
    )
    relay = Started("gannet.dev.relay", str(stack.services.ports.pubsub), port=port)
    try:
        # The channel reconnects after gRPC's backoff, which grew while Pub/Sub was away
        # (seconds): the streams resume then too, and so does the watch's answer.
        deadline = time.monotonic() + 30
        while watch.down_since is not None and time.monotonic() < deadline:
            watch.check()
    finally:
        relay.stop()
    said = [r for r in caplog.records if r.name == "gannet.pubsub_watch"]
    assert said[-1].levelname == "INFO" and "answers again" in said[-1].getMessage()
    assert watch.down_since is None
