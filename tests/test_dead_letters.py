"""`gannet dead-letters`: an operator lists what was dead-lettered and replays it."""

from __future__ import annotations

import json
import time

from conftest import SAMPLES, SCENES, expected_counts

from gannet.cli import build_parser
from gannet.cluster import dead_letters


def test_listing_removes_nothing_and_a_fixed_task_replays_to_success(stack):
    """Two poison messages are listed with their reasons, twice (listing removes
    nothing); once the missing image is uploaded, replaying that code alone turns the
    task's failed row into a succeeded one, and only the other message is left."""
    late = stack.task(f"gs://gannet-images/{stack.tenant}/late/scene.jpg")
    daemon = stack.start_daemon()
    stack.publish([late])
    stack.publish_raw(b"{not json")

    def listed() -> list[dict]:  # in no particular order: Pub/Sub promises none here
        return sorted(stack.dead_letters(2), key=lambda letter: json.dumps(letter, sort_keys=True))

    letters = listed()
    assert listed() == letters, "listing must leave the messages where they are"
    by_code = {d["error_code"]: d for d in letters}
    assert set(by_code) == {"image_not_found", "bad_json"}
    assert by_code["image_not_found"]["task_id"] == late.task_id
    assert by_code["image_not_found"]["tenant_id"] == stack.tenant
    assert "does not exist" in by_code["image_not_found"]["error"]
    assert stack.rows([late.task_id])[late.task_id]["status"] == "failed"

    table = stack.gannet("dead-letters")
    assert table.returncode == 0, table.stderr
    assert late.task_id in table.stdout and "2 of 2 dead letters shown" in table.stdout

    refused = stack.gannet("dead-letters", "--replay")
    assert refused.returncode == 2 and "--code" in refused.stderr, "replay must say what"

    stack.storage.client.bucket("gannet-images").blob(
        f"{stack.tenant}/late/scene.jpg"
    ).upload_from_filename(str(SAMPLES / SCENES[0]["file"]))
    replayed = stack.gannet("dead-letters", "--replay", "--code", "image_not_found")
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1 of 1" in replayed.stdout

    deadline = time.monotonic() + 60
    row = {}
    while time.monotonic() < deadline:
        row = stack.rows([late.task_id])[late.task_id]
        if row["status"] == "succeeded":
            break
        time.sleep(0.3)
    assert row["status"] == "succeeded", row
    assert row["result"]["detection"]["counts"] == expected_counts(SCENES[0])
    assert [d["error_code"] for d in stack.dead_letters(1)] == ["bad_json"]
    assert daemon.stop() == 0


def test_a_replay_stopped_by_its_limit_says_so_and_the_next_run_replays_the_rest(stack):
    """Five letters of one code and two of another; a replay of the first code that may
    look at four letters stops there, says so and exits 1; run again it replays the
    rest. Each of the five reaches the tasks topic once; the other two stay."""
    topic = stack.settings.path("topics", stack.settings.dead_letter_topic)
    bodies = [f'{{"n": {i}}}'.encode() for i in range(7)]
    for i, body in enumerate(bodies):
        code = "image_not_found" if i < 5 else "bad_json"
        stack.publisher.publish(topic, body, error_code=code, error="x").result(timeout=30)

    first = stack.gannet("dead-letters", "--replay", "--code", "image_not_found", "--limit", "4")
    assert first.returncode == 1, first.stderr
    assert "stopped after looking at --limit 4" in first.stderr
    second = stack.gannet("dead-letters", "--replay", "--code", "image_not_found")
    assert second.returncode == 0, second.stderr
    assert "stopped" not in second.stderr

    arrived: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(arrived) < 5 and time.monotonic() < deadline:
        arrived += [m.data for m in stack.pull(stack.settings.subscription, timeout_s=2)]
    # Any copy more is there at once (the replays have returned): a last 0.25 s look.
    arrived += [m.data for m in stack.pull(stack.settings.subscription, timeout_s=1.25)]
    assert sorted(arrived) == sorted(bodies[:5])  # each once
    assert sorted(d["error_code"] for d in stack.dead_letters(2)) == ["bad_json", "bad_json"]


def test_a_replay_from_another_lanes_subscription_must_name_its_lane(stack):
    """Replayed letters go to the lane's own topic: a --subscription that is not the
    lane's dead-letter subscription is refused unless --lane says whose it is."""
    refused = stack.gannet(
        "dead-letters", "--replay", "--all", "--subscription", "gannet-dead-letter-bulk-sub"
    )
    assert refused.returncode == 2
    assert "name the lane it belongs to with --lane" in refused.stderr


def test_a_replayed_task_dead_lettered_again_is_not_replayed_again_by_the_same_run(stack):
    """A task replayed before its cause is fixed (its image still missing) is
    dead-lettered again within milliseconds, while the run still pulls: the run pulled
    that new letter and replayed it, and again, up to --limit times (997 copies of one
    letter, each a quarantine and a row rewritten). A run replays a body once: the
    letter dead-lettered again stays, and the run says why."""
    missing = stack.task(f"gs://gannet-images/{stack.tenant}/missing/scene.jpg")
    daemon = stack.start_daemon()
    (sent,) = stack.publish([missing])
    (letter,) = stack.dead_letters(1)
    assert (letter["task_id"], letter["original_message_id"]) == (missing.task_id, sent)
    replayed = stack.gannet(
        "dead-letters", "--replay", "--code", "image_not_found", "--limit", "40"
    )
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1 of 1" in replayed.stdout
    time.sleep(2)  # any copy in flight reaches the dead-letter topic
    (again,) = stack.dead_letters(1)
    assert again["message_id"] != letter["message_id"], "dead-lettered again"
    # ... and still naming the message the backend sent, not the replay's copy
    assert (again["task_id"], again["original_message_id"]) == (missing.task_id, sent)
    assert daemon.stop() == 0


def test_a_misspelt_code_is_refused_once_naming_the_codes(stack):
    """`--code image_missing` matched nothing and said only `none match` (a replay:
    `replayed 0 of 0`, exit 0), once per lane: it is refused, once, with the codes a
    dead letter can carry."""
    for extra in ((), ("--replay",)):
        out = stack.gannet(
            "dead-letters", *extra, "--code", "image_missing", GANNET_LANES="interactive:4,bulk:1"
        )
        assert out.returncode == 2, out.stdout + out.stderr
        assert out.stderr.count("no such --code image_missing") == 1, out.stderr
        assert "image_not_found" in out.stderr and "retries_exhausted" in out.stderr
        assert out.stdout == ""


def test_discard_drops_the_chosen_letters_and_replays_nothing(stack, monkeypatch, capsys):
    """A letter handled otherwise (its backend told, its task no longer wanted) could
    only be removed with `gcloud pubsub subscriptions seek`, which drops every letter
    before a time, unhandled ones too. `--discard` acks the letters chosen by
    `--message` or `--code` alone; nothing reaches the tasks topic, the rest stay."""
    topic = stack.settings.path("topics", stack.settings.dead_letter_topic)
    for body, code in ((b'{"n": 1}', "image_not_found"), (b'{"n": 2}', "image_not_found")):
        stack.publisher.publish(topic, body, error_code=code, error="x").result(timeout=30)
    stack.publisher.publish(topic, b"{not json", error_code="bad_json", error="x").result(
        timeout=30
    )
    letters = stack.dead_letters(3)

    for refused_args in (("--discard",), ("--discard", "--replay", "--all")):
        refused = stack.gannet("dead-letters", *refused_args)
        assert refused.returncode == 2, refused_args
        assert refused.stdout == "", refused.stdout

    # In this process, with a 2 s lease: a letter chosen but not acked would be back
    # in the listing by the time it is read.
    monkeypatch.setattr(dead_letters, "_LEASE_S", 2)
    one = next(d for d in letters if d["error_code"] == "image_not_found")
    args = build_parser().parse_args(["dead-letters", "--discard", "--message", one["message_id"]])
    assert dead_letters.refusal(args) is None
    subscription = stack.settings.path("subscriptions", stack.settings.dead_letter_subscription)
    rc = dead_letters.main(args, stack.publisher, stack.subscriber, "unused", subscription)
    assert rc == 0
    assert "discarded 1 dead letters" in capsys.readouterr().out
    time.sleep(3)
    left = stack.dead_letters(2)
    assert one["message_id"] not in {d["message_id"] for d in left}
    assert sorted(d["error_code"] for d in left) == ["bad_json", "image_not_found"]

    by_code = stack.gannet("dead-letters", "--discard", "--code", "bad_json", "--json")
    assert by_code.returncode == 0, by_code.stderr
    (gone,) = [json.loads(line) for line in by_code.stdout.splitlines()]
    assert (gone["error_code"], gone["discarded"]) == ("bad_json", True)
    assert [d["error_code"] for d in stack.dead_letters(1)] == ["image_not_found"]
    assert stack.pull(stack.settings.subscription, timeout_s=2) == [], "nothing replayed"
