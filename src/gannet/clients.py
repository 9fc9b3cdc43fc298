"""Google Cloud clients built from Settings, pointed at emulators when configured."""

from __future__ import annotations

import os

from google.cloud import pubsub_v1, storage

from gannet import storage as gannet_storage
from gannet.settings import Settings


def pubsub_clients(
    settings: Settings,
) -> tuple[pubsub_v1.PublisherClient, pubsub_v1.SubscriberClient]:
    if settings.pubsub_emulator_host:
        # The client library reads this variable itself to pick an insecure channel;
        # we only write it, from the one settings object.
        os.environ["PUBSUB_EMULATOR_HOST"] = settings.pubsub_emulator_host
    return pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()


def storage_client(settings: Settings) -> storage.Client:
    return gannet_storage.make_client(settings.project, settings.storage_emulator_host)
