"""Prometheus metrics of one daemon, in their own registry (no module-level globals).

The per-pod gauges (in flight, leased-but-waiting, outstanding) are what an HPA on pod
metrics reads; the subscription gauges mirror Cloud Monitoring for dashboards.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Publish to commit: from a task that never waited to one that waited out a backfill.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
# One batch's forward pass or nvJPEG call, milliseconds to a couple of seconds.
CALL_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages = Counter(
            "gannet_messages", "Messages handled, by outcome.", ["outcome"], registry=r
        )
        self.acks_failed = Counter(
            "gannet_acks_failed",
            "Acks of settled messages whose Acknowledge request failed, by lane: Pub/Sub "
            "redelivers those messages after their ack deadline (a committed task is then "
            "acked as a duplicate). The outcome counter still counts them as settled.",
            ["lane"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "gannet_stage_seconds",
            "Time spent per stage of a task (fetch, decode, model steps, sink, total).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.stage_cpu_seconds = Counter(
            "gannet_stage_cpu_seconds",
            "CPU time per stage, of the thread doing it, without the stages nested in it "
            "(forward: the model thread's own CPU, not torch's worker threads).",
            ["stage"],
            registry=r,
        )
        self.in_flight = Gauge(
            "gannet_messages_in_flight", "Tasks a runner is working on now.", registry=r
        )
        self.leased_waiting = Gauge(
            "gannet_messages_leased_waiting",
            "Messages leased from Pub/Sub and waiting for a free runner.",
            registry=r,
        )
        self.outstanding = Gauge(
            "gannet_messages_outstanding",
            "Leased-but-waiting plus in flight: the per-pod HPA signal.",
            registry=r,
        )
        self.lane_waiting = Gauge(
            "gannet_lane_messages_waiting",
            "Messages of the lane leased and waiting for a free runner.",
            ["lane"],
            registry=r,
        )
        self.lane_in_flight = Gauge(
            "gannet_lane_messages_in_flight",
            "Tasks of the lane a runner is working on now.",
            ["lane"],
            registry=r,
        )
        self.lane_lease = Gauge(
            "gannet_lane_lease_messages",
            "Messages the lane's stream may lease now: GANNET_MAX_MESSAGES, grown while "
            "runners wait behind a full lease (lease.py).",
            ["lane"],
            registry=r,
        )
        self.lane_latency = Histogram(
            "gannet_lane_latency_seconds",
            "From the task's publish to its committed row (succeeded tasks), by lane.",
            ["lane"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_loads = Counter(
            "gannet_model_loads",
            "Model loads, by model and device (a model's file name; tenants' own "
            "models as tenants/FILE, whatever the tenant: the logs name it).",
            ["model", "device"],
            registry=r,
        )
        self.model_evictions = Counter(
            "gannet_model_evictions",
            "Models evicted from the cache.",
            ["model", "device"],
            registry=r,
        )
        self.model_load_failures = Counter(
            "gannet_model_load_failures",
            "Model loads that failed (a missing, corrupt or oversized file, another kind "
            "of model than configured, GCS not answering), by model and device.",
            ["model", "device"],
            registry=r,
        )
        self.models_loaded_bytes = Gauge(
            "gannet_models_loaded_bytes",
            "What the loaded models hold on a device (their CUDA graphs included), as "
            "counted against GANNET_MODEL_MEMORY_BUDGET_MB.",
            ["device"],
            registry=r,
        )
        self.batch_size = Histogram(
            "gannet_batch_size",
            "Images per model call.",
            buckets=(1, 2, 4, 8, 16, 32),
            registry=r,
        )
        # Its rate is the share of the time a model's batcher thread spends in forward
        # passes: on the CPU the passes, on a GPU their launch (operating.md). A pod's
        # series sums its processes' (supervisor.py): there it reaches GANNET_PROCESSES.
        self.forward_seconds = Histogram(
            "gannet_forward_seconds",
            "Wall seconds per model call (one forward pass over a batch), by model.",
            ["model", "device"],
            buckets=CALL_BUCKETS,
            registry=r,
        )
        # Its rate is the share of the time a device's JPEG decoder thread is busy
        # (device_decode.py): near 1, that one thread binds (runbook.md); in a pod's
        # series, summed over its processes (one thread each), near GANNET_PROCESSES.
        self.device_decode_seconds = Histogram(
            "gannet_device_decode_seconds",
            "Wall seconds per nvJPEG call (a batch of the runners' JPEGs), by device.",
            ["device"],
            buckets=CALL_BUCKETS,
            registry=r,
        )
        # Its mean (sum / count) is the JPEGs per call: a JPEG engine decodes a call's
        # photos side by side, so calls of one or two may leave part of it idle while
        # the decoder thread binds (operating.md).
        self.device_decode_batch_size = Histogram(
            "gannet_device_decode_batch_size",
            "JPEGs per nvJPEG call, by device.",
            ["device"],
            buckets=(1, 2, 4, 8, 16, 32),
            registry=r,
        )
        self.config_reloads = Counter(
            "gannet_config_reloads",
            "Industry config reloads, by result.",
            ["result"],
            registry=r,
        )
        self.configs_rejected = Gauge(
            "gannet_configs_rejected",
            "Configs (an industry's, the deployment's mapping) whose stored version was "
            "rejected: each serves its previous version until a good one is stored.",
            registry=r,
        )
        self.config_info = Gauge(
            "gannet_config_info",
            "1 for each industry config served: its industry, its own `version:` and its "
            "stored version (the object's generation on GCS, mtime-size for a file).",
            ["industry", "version", "generation"],
            registry=r,
        )
        self.callbacks = Counter(
            "gannet_callbacks", "Result callbacks, by result.", ["result"], registry=r
        )
        # The whole table's, as this process's last sweep read it: every pod exports
        # the same value (take the max of the freshest), and no pod running means none.
        self.callbacks_due_oldest = Gauge(
            "gannet_callbacks_due_oldest_seconds",
            "How long the oldest callback owed in PostgreSQL (callback_outbox) has been due "
            "without a pod taking it over, as of this process's last sweep; 0 when none is "
            "due. Each sweep takes due ones over, so it stays under a quarter of "
            "GANNET_CALLBACK_LEASE_S unless the sweeps fail or fall behind.",
            registry=r,
        )
        self.callbacks_due = Gauge(
            "gannet_callbacks_due",
            "Callbacks owed in PostgreSQL and due, not taken over by any pod yet, as of this "
            "process's last sweep.",
            registry=r,
        )
        self.callbacks_swept = Gauge(
            "gannet_callbacks_last_sweep_timestamp_seconds",
            "Unix time of this process's last complete sweep of the callbacks owed (every "
            "quarter of GANNET_CALLBACK_LEASE_S): the two gauges above are as old as this.",
            registry=r,
        )
        # The three gauges by lane have a lane's series only once a poll of it succeeded
        # (backlog.py): absent, not 0, while monitoring is off or every poll fails.
        self.backlog = Gauge(
            "gannet_subscription_backlog_messages",
            "Undelivered messages in the lane's subscription (Cloud Monitoring, when enabled).",
            ["lane"],
            registry=r,
        )
        self.pubsub_last_reached = Gauge(
            "gannet_pubsub_last_reached_timestamp_seconds",
            "Unix time Pub/Sub last answered this process (asked every 30 s): a pod whose "
            "streams cannot reach it sees no message and writes no ack.",
            registry=r,
        )
        self.backlog_last_success = Gauge(
            "gannet_backlog_last_success_timestamp_seconds",
            "Unix time of the lane's last successful Cloud Monitoring backlog poll: the "
            "subscription gauges are as old as this.",
            ["lane"],
            registry=r,
        )
        self.backlog_poll_errors = Counter(
            "gannet_backlog_poll_errors", "Failed Cloud Monitoring backlog polls.", registry=r
        )
        self.oldest_unacked_age = Gauge(
            "gannet_subscription_oldest_unacked_age_seconds",
            "Age of the lane's oldest unacked message (Cloud Monitoring, when enabled).",
            ["lane"],
            registry=r,
        )
