"""Google Cloud clients built from Settings, pointed at emulators when configured."""

from __future__ import annotations

import os

import google.cloud.pubsub_v1 as pubsub_v1
import google.cloud.storage as storage
import grpc
from google.auth.exceptions import DefaultCredentialsError
from google.cloud.pubsub_v1 import types
from google.pubsub_v1.services.publisher.transports.grpc import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports.grpc import SubscriberGrpcTransport

from gannet import storage as gannet_storage
from gannet.errors import CommandError
from gannet.settings import Settings


def pubsub_clients(
    settings: Settings,
) -> tuple[pubsub_v1.PublisherClient, pubsub_v1.SubscriberClient]:
    if settings.pubsub_emulator_host:
        # The client library reads this variable itself to pick an insecure channel;
        # we only write it, from the one settings object.
        os.environ["PUBSUB_EMULATOR_HOST"] = settings.pubsub_emulator_host
    # With tracing on, the client carries the trace context in the message (publisher)
    # and continues it (subscriber): tracing.py.
    traced = settings.traced
    publisher: dict[str, object] = {}
    subscriber: dict[str, object] = {}
    if settings.pubsub_emulator_host:
        # The library's own channel to an emulator has gRPC's default 4 MiB limit on a
        # message received (its channel to Pub/Sub has none): one streaming-pull
        # response of a few large bodies exceeded it, and the stream failed in silence
        # while Pub/Sub dead-lettered good tasks behind them (the demo, soak and tests).
        unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]

        def channel() -> grpc.Channel:
            return grpc.insecure_channel(settings.pubsub_emulator_host, options=unlimited)

        publisher["transport"] = PublisherGrpcTransport(channel=channel())
        subscriber["transport"] = SubscriberGrpcTransport(channel=channel())
    try:
        return (
            pubsub_v1.PublisherClient(
                publisher_options=types.PublisherOptions(enable_open_telemetry_tracing=traced),
                **publisher,
            ),
            pubsub_v1.SubscriberClient(
                subscriber_options=types.SubscriberOptions(enable_open_telemetry_tracing=traced),
                **subscriber,
            ),
        )
    except DefaultCredentialsError as exc:
        raise NoCredentials(str(exc)) from exc


def storage_client(settings: Settings) -> storage.Client:
    try:
        return gannet_storage.make_client(
            settings.project,
            settings.storage_emulator_host,
            connections=max(10, settings.runners + 2),  # + config and model downloads
        )
    except DefaultCredentialsError as exc:
        raise NoCredentials(str(exc)) from exc


class NoCredentials(CommandError):
    """No Google credentials and no emulator: say how to get either."""

    def __str__(self) -> str:
        return (
            "no Google Cloud credentials found. On GKE use Workload Identity; on a laptop "
            "run `gcloud auth application-default login`, or point Gannet at the local "
            "emulators (`gannet services` prints the variables to export)."
        )
