"""Poison messages are quarantined with a reason; good messages keep flowing."""

from __future__ import annotations

import json
import struct

import cv2
import numpy as np
from conftest import SCENES, expected_counts, progressive_jpeg


def test_poison_messages_go_to_dead_letter_with_reason_and_good_ones_flow(stack):
    """Each kind of bad input ends in the dead-letter topic with its error_code, gets a
    failed row where the task is identifiable, and does not stop the good tasks."""
    good_url = stack.upload(SCENES[0]["file"])
    not_an_image = stack.upload("notes.jpg", data=b"this is a text file, not a JPEG")
    # Valid, but 694 scans: a pass over the whole image each (image_header.MAX_SCANS).
    many_scans = stack.upload("scans.jpg", data=progressive_jpeg(1024, 768, coefficients=63))
    other = stack.task(good_url)  # a valid task, to build variants from
    base = json.loads(other.model_dump_json())

    def variant(**changes):
        body = {**base, "task_id": f"{stack.tenant}-{len(poison)}", **changes}
        return {k: v for k, v in body.items() if v is not None}

    poison: list[tuple[bytes, str, str | None]] = []  # (body, error_code, task_id or None)

    def add(body_dict, code):
        poison.append((json.dumps(body_dict).encode(), code, body_dict.get("task_id")))

    poison.append((b"{not json", "bad_json", None))
    add(variant(pipeline=None), "schema_error")  # a required field missing
    add(variant(pipeline="NO_SUCH_PIPELINE"), "unknown_pipeline")
    add(variant(image_url=good_url.replace(stack.tenant, "someone-else")), "image_outside_tenant")
    add(variant(image_url=f"gs://gannet-images/{stack.tenant}/../x/a.jpg"), "image_outside_tenant")
    add(variant(image_url=f"gs://gannet-images/{stack.tenant}/missing.jpg"), "image_not_found")
    # The task_id names the result object: with a '..' segment the emulator refused the
    # write, so the task was retried to Pub/Sub's dead letter, with no reason and no row.
    add(variant(task_id=f"{stack.tenant}-dots/../x"), "schema_error")
    add(variant(image_url=not_an_image), "image_undecodable")
    # An empty object, a PNG cut after its header, and a PNG whose header claims
    # 100,000 x 100,000 pixels (refused from the header: never decoded).
    empty = stack.upload("empty.jpg", data=b"")
    png = cv2.imencode(".png", np.zeros((64, 64, 3), np.uint8))[1].tobytes()
    cut_png = stack.upload("cut.png", data=png[: len(png) // 2])
    huge = png[:16] + struct.pack(">II", 100_000, 100_000) + png[24:]
    bomb = stack.upload("bomb.png", data=huge)
    add(variant(image_url=empty), "image_undecodable")
    add(variant(image_url=cut_png), "image_undecodable")
    add(variant(image_url=bomb), "image_too_large")
    add(variant(image_url=many_scans), "image_undecodable")
    poison.append((json.dumps({**base, "pad": "x" * 300_000}).encode(), "body_too_large", None))
    # Bodies whose failed row or dead letter could not be written as they came, which
    # stopped the daemon's stream (nested past the stack, text PostgreSQL cannot store).
    poison.append((b"[" * 100_000, "bad_json", None))
    add(variant(session_id="a\u0000b"), "schema_error")
    add(variant(image_url=good_url + "\ud800", pipeline="NO_SUCH_PIPELINE"), "schema_error")
    add({**variant(), "x\u0000y": 1}, "schema_error")

    good = [stack.task(good_url) for _ in range(4)]
    daemon = stack.start_daemon()
    # Interleave: good, poison, good, poison ...
    for i, (body, _, _) in enumerate(poison):
        if i < len(good):
            stack.publish([good[i]])
        stack.publish_raw(body)

    rows = stack.wait_rows([t.task_id for t in good])
    assert all(rows[t.task_id]["status"] == "succeeded" for t in good)
    assert all(
        rows[t.task_id]["result"]["detection"]["counts"] == expected_counts(SCENES[0]) for t in good
    )

    dead = stack.pull_dead_letters(len(poison))
    by_body = {m.data: m.attributes for m in dead}
    assert len(dead) == len(poison)
    for body, code, task_id in poison:
        attributes = by_body[body]
        assert attributes["error_code"] == code, (code, attributes)
        assert attributes["error"], "the reason must be readable"
        if task_id:
            assert attributes["task_id"] == task_id

    identifiable = [task_id for _, _, task_id in poison if task_id]
    failed = stack.rows(identifiable)
    assert {r["task_id"] for r in failed.values()} == set(identifiable)
    assert all(r["status"] == "failed" and r["error_code"] for r in failed.values())

    assert daemon.proc.poll() is None, "poison must never crash the daemon"
    assert daemon.stop() == 0
    # Quarantined messages were acked, not left for redelivery: none was nacked back at
    # the stop, and no ack request failed (its messages would come back after the lease).
    # A nacked message is there at once: a pull of 1.25 s, which the emulator answers
    # after 0.25 s when it has nothing, looks long enough.
    assert stack.pull(stack.settings.subscription, timeout_s=1.25) == []
    assert "acks not delivered" not in daemon.log_path.read_text()


def test_a_burst_of_large_bodies_does_not_stop_the_stream(stack):
    """Sixty bodies of 300 KB waiting when the daemon starts, then good tasks: the
    emulator sends what it has in one streaming-pull response, and the Pub/Sub client's
    own channel to an emulator refused a message over gRPC's default 4 MiB. The stream
    failed in silence, retried, failed again, and Pub/Sub dead-lettered the good tasks
    behind the large bodies without a reason, none of them run. (Pub/Sub itself answers
    within 10 MB a message and the client's channel to it has no such limit: this was
    the demo's, the soak's and the tests' own.)"""
    good = [stack.task(stack.upload(SCENES[0]["file"])) for _ in range(5)]
    base = json.loads(good[0].model_dump_json())
    large = [
        json.dumps({**base, "task_id": f"{stack.tenant}-big-{i}", "pad": "x" * 300_000}).encode()
        for i in range(60)
    ]
    for body in large:
        stack.publish_raw(body)
    stack.publish(good)
    daemon = stack.start_daemon()
    rows = stack.wait_rows([t.task_id for t in good], timeout_s=60)
    assert all(rows[t.task_id]["status"] == "succeeded" for t in good)
    dead = stack.pull_dead_letters(len(large))
    assert sorted(m.attributes["error_code"] for m in dead) == ["body_too_large"] * len(large)
    assert daemon.stop() == 0
