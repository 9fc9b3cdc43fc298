"""Message contract v1: what is accepted, and the reasons given for what is not."""

from __future__ import annotations

import json

import pytest

from gannet.errors import ErrorCode, PermanentError
from gannet.storage import check_image_url
from gannet.task import GsUrl, identify, parse_task

LIMIT = 256 * 1024
GOOD = {
    "task_id": "t-1",
    "tenant_id": "acme-farms",
    "image_url": "gs://gannet-images/acme-farms/field/1.jpg",
    "pipeline": "DETECTION",
}


def body(**changes) -> bytes:
    data = {**GOOD, **changes}
    return json.dumps({k: v for k, v in data.items() if v is not None}).encode()


def code_of(raw: bytes) -> tuple[ErrorCode, str]:
    with pytest.raises(PermanentError) as err:
        parse_task(raw, LIMIT)
    return err.value.code, err.value.message


def test_minimal_and_full_tasks_parse():
    task = parse_task(body(), LIMIT)
    assert (task.task_id, task.tenant_id, task.pipeline) == ("t-1", "acme-farms", "DETECTION")
    full = parse_task(
        body(
            session_id="s",
            image_id="i",
            options={"confidence_override": 0.7},
            callback_url="https://backend.example.com/hook",
        ),
        LIMIT,
    )
    assert full.options.confidence_override == 0.7 and full.session_id == "s"
    # An internationalised host resolves (IDNA) and http.client sends it: accepted.
    assert parse_task(body(callback_url="https://b\u00fccher.example/hook"), LIMIT).callback_url
    # A scheme is case-insensitive: HTTPS:// was refused, and with it the whole task.
    assert parse_task(body(callback_url="HTTPS://backend.example.com/h"), LIMIT).callback_url


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"task_id": None}, "task_id"),
        ({"tenant_id": "Acme"}, "tenant_id"),
        ({"tenant_id": "a" * 64}, "tenant_id"),
        ({"image_url": "https://example.com/x.jpg"}, "image_url"),
        ({"pipeline": None}, "pipeline"),
        ({"options": {"confidence_override": 1.5}}, "options.confidence_override"),
        # Below 0.001 every anchor passes: hundreds of junk segments, GBs of masks.
        ({"options": {"confidence_override": 0.0}}, "options.confidence_override"),
        ({"options": {"confidence": 0.5}}, "options.confidence"),
        ({"colour": "red"}, "colour"),
        ({"callback_url": "ftp://x"}, "callback_url"),
        # Text PostgreSQL or a dead letter's attributes cannot hold, or a URL http.client
        # cannot send: refused here, not a failure later on the way to a row.
        ({"session_id": "a\u0000b"}, "session_id"),
        ({"pipeline": "DETECTION\u0000"}, "pipeline"),
        ({"image_url": "gs://gannet-images/acme-farms/\ud800.jpg"}, "image_url"),
        # No object name is longer than 1024 bytes in UTF-8: Cloud Storage answers such
        # a read 400, which was retried until Pub/Sub dead-lettered it with no reason.
        ({"image_url": "gs://gannet-images/acme-farms/" + "\u00e9" * 507 + ".jpg"}, "image_url"),
    ],
)
def test_schema_errors_name_the_field(changes, field):
    code, message = code_of(body(**changes))
    assert code is ErrorCode.SCHEMA_ERROR
    assert message.startswith(field) or f"; {field}" in message, message


@pytest.mark.parametrize("task_id", ["a/../b", "../other-tenant/t-1", "./t-1", "a/./b", "x/.."])
def test_a_task_id_with_a_dot_segment_is_refused(task_id):
    """The task_id becomes the result object's name under TENANT/. A '.' or '..' segment
    there is a name that curl, browsers and path libraries resolve to another object
    (`TENANT/../other-tenant/t-1.json` to `other-tenant/t-1.json`), and the GCS emulator
    refused the write, so the task ran its models five times and was dead-lettered with
    no reason. Refused as the image_url's segments are."""
    code, message = code_of(body(task_id=task_id))
    assert code is ErrorCode.SCHEMA_ERROR
    assert message.startswith("task_id") and "'.' or '..'" in message, message


@pytest.mark.parametrize("task_id", ["2026/11/order-1", "a..b", "...", ".hidden", "x./y", "v1.2"])
def test_a_task_id_with_dots_inside_its_segments_is_accepted(task_id):
    assert parse_task(body(task_id=task_id), LIMIT).task_id == task_id


def test_bad_json_and_oversized_bodies_are_rejected_with_their_own_codes():
    assert code_of(b"{nope")[0] is ErrorCode.BAD_JSON
    assert code_of(b"\xff\xfe")[0] is ErrorCode.BAD_JSON
    assert code_of(b"[1, 2]")[0] is ErrorCode.SCHEMA_ERROR
    assert code_of(b"[" * 100_000)[0] is ErrorCode.BAD_JSON  # deeper than the stack
    code, message = code_of(body(session_id="x" * 100) + b" " * LIMIT)
    assert code is ErrorCode.BODY_TOO_LARGE and str(LIMIT) in message


def test_a_body_of_exactly_the_limit_is_accepted_and_one_byte_more_is_not():
    """GANNET_MAX_BODY_BYTES is the largest body accepted, not the first one refused."""
    raw = body()
    at_limit = raw + b" " * (LIMIT - len(raw))
    assert parse_task(at_limit, LIMIT).task_id == "t-1"
    code, message = code_of(at_limit + b" ")
    assert code is ErrorCode.BODY_TOO_LARGE and f"{LIMIT + 1} bytes" in message


def test_identify_finds_ids_of_invalid_bodies_only_when_safe():
    assert identify(body(pipeline=None)) == ("t-1", "acme-farms")
    assert identify(body(tenant_id="NOT VALID")) == ("t-1", None)
    assert identify(b"garbage") == (None, None)
    assert identify(body(task_id="t\u0000", pipeline=None)) == (None, "acme-farms")
    assert identify(b"[" * 100_000) == (None, None)


def test_an_object_of_thousands_of_fields_is_refused_by_count_with_a_short_reason():
    """20,000 unknown fields fit in the body limit: pydantic made an error of each, 0.1 s
    of GIL, and the reason that went into the row, the dead letter and the log was 0.8
    MB. Refused by count now, naming a few; other refusals name five problems at most,
    and a field's name is cut to 64 characters."""
    wide = json.loads(body())
    wide.update({f"k{i}": 0 for i in range(20_000)})
    code, message = code_of(json.dumps(wide).encode())
    assert code is ErrorCode.SCHEMA_ERROR
    fields = len(wide)
    assert message.startswith(f"{fields} fields, where a task has 9 at most (unknown: k0, k1, k2")
    assert len(message) < 200
    crowded_options = json.loads(body())
    crowded_options["options"] = {f"o{i}": 0 for i in range(10)}
    code, message = code_of(json.dumps(crowded_options).encode())
    assert message.startswith("10 fields, where options has 1 at most (unknown: options.o0,")
    several = json.loads(body())
    several.update({f"{'x' * 100}{i}": 0 for i in range(7)})
    code, message = code_of(json.dumps(several).encode())
    assert message.count("Extra inputs are not permitted") == 5
    assert message.endswith("; and 2 more") and "x" * 65 not in message


def test_a_refused_field_name_is_quoted_storably():
    """The reason names the publisher's unknown field as it came, escaped where a row or
    a dead letter's attribute could not hold it."""
    code, message = code_of(body(**{"x\u0000y": 1}))
    assert code is ErrorCode.SCHEMA_ERROR
    assert message == "x\\x00y: Extra inputs are not permitted", message


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("gs://other-bucket/acme-farms/a.jpg", ErrorCode.BUCKET_NOT_ALLOWED),
        ("gs://gannet-images/someone-else/a.jpg", ErrorCode.IMAGE_OUTSIDE_TENANT),
        ("gs://gannet-images/acme-farms/../someone-else/a.jpg", ErrorCode.IMAGE_OUTSIDE_TENANT),
        ("gs://gannet-images/acme-farms/%2e%2e/someone-else/a.jpg", ErrorCode.IMAGE_OUTSIDE_TENANT),
        ("gs://gannet-images/acme-farms%2Fx/a.jpg", ErrorCode.IMAGE_OUTSIDE_TENANT),
        ("gs://gannet-images/acme-farms\\..\\b/a.jpg", ErrorCode.IMAGE_OUTSIDE_TENANT),
        ("gs://gannet-images/acme-farms//a.jpg", ErrorCode.IMAGE_OUTSIDE_TENANT),
        ("gs://gannet-images/acme-farms", ErrorCode.IMAGE_OUTSIDE_TENANT),
        ("gs://gannet-images/acme-farms-2/a.jpg", ErrorCode.IMAGE_OUTSIDE_TENANT),
    ],
)
def test_image_must_be_in_an_allowed_bucket_under_the_tenant_prefix(url, code):
    with pytest.raises(PermanentError) as err:
        check_image_url(GsUrl.parse(url), "acme-farms", ["gannet-images"])
    assert err.value.code is code


def test_image_under_the_tenant_prefix_is_allowed_and_parsed_once():
    task = parse_task(
        json.dumps(
            {**GOOD, "image_url": "gs://gannet-images/acme-farms/2026/field 1/a.jpg"}
        ).encode(),
        LIMIT,
    )
    check_image_url(task.image_url, "acme-farms", ["gannet-images"])
    assert (task.image_url.bucket, task.image_url.name) == (
        "gannet-images",
        "acme-farms/2026/field 1/a.jpg",
    )
    assert json.loads(task.model_dump_json())["image_url"] == str(task.image_url)
