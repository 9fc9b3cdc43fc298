"""`gannet soak`: its help, how it tells a re-run from double inference, and one small
soak on services of its own (it starts them itself), checked as a user reads the report."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gannet.cli import build_parser
from gannet.config_schema import DeploymentConfig
from gannet.dev import soak
from gannet.errors import PermanentError
from gannet.task import identify, parse_task

TENANTS = soak.Tenants.of("tenant-q0123abcd")
ASSETS = soak.Assets(
    bucket="gannet-images",
    scenes=[f"gs://gannet-images/{TENANTS.own}/samples/scene_0{i}.jpg" for i in (1, 2, 3)],
    not_an_image=f"gs://gannet-images/{TENANTS.own}/raw/notes.jpg",
    too_large=f"gs://gannet-images/{TENANTS.own}/raw/huge.png",
    unknown_tenants_scene=f"gs://gannet-images/{TENANTS.unknown}/samples/scene_01.jpg",
    max_body_bytes=256 * 1024,
)


def _entry(task_id, outcome, inferred=True):
    entry = {"task_id": task_id, "outcome": outcome, "message": f"task {outcome}"}
    if inferred:
        entry["inferred"] = True
    return entry


def test_soak_help_says_what_it_does_and_what_the_exit_status_means(capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["soak", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for option in ("--tasks", "--poison", "--seed", "--kills", "--sigterms"):
        assert option in out
    for option in ("--postgres-restarts", "--settle-timeout-s", "--report"):
        assert option in out
    assert "kill" in out and "SIGTERM" in out and "PostgreSQL" in out
    assert "Exit status: 0 when nothing was lost" in out


def test_a_service_that_will_not_start_exits_2_not_1(tmp_path):
    """The help promises 2 when a service would not start, so that a CI job can tell a
    broken machine from a lost task (1). Here gcloud is not on the PATH."""
    venv_bin = str(Path(sys.executable).parent)
    out = subprocess.run(
        [sys.executable, "-m", "gannet", "soak", "--tasks", "20", "--state-dir", str(tmp_path)],
        env={**os.environ, "PATH": venv_bin},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "gcloud not found" in out.stdout


def test_a_nacked_inference_then_a_success_is_a_rerun_not_double_inference():
    entries = [
        _entry("pg-down", "retry"),  # PostgreSQL down at the commit: nacked
        _entry("other", "succeeded"),
        _entry("pg-down", "succeeded"),
        _entry("stopped", "shutdown"),
        _entry("stopped", "busy"),
        _entry("stopped", "duplicate"),
    ]
    found = soak.classify_inferences(entries)
    assert found.rerun_after_fault == ["pg-down", "stopped"]
    assert found.inferred_more_than_once == []
    assert found.per_task["other"] == ["succeeded"]
    assert found.flag_seen


def test_an_inference_after_an_acked_one_is_double_inference_and_uninferred_lines_do_not():
    entries = [
        _entry("twice", "succeeded"),
        _entry("twice", "duplicate"),  # ran the model again, then found the commit
        _entry("once", "succeeded"),
        _entry("once", "duplicate", inferred=False),  # acked without running the model
        _entry("again", "succeeded"),
        _entry("again", "retry"),  # ran again after its success, then failed: still twice
        _entry("unknown", "mislaid"),  # an outcome this soak does not know
        _entry("unknown", "succeeded"),
        {"message": "gannet is ready"},
    ]
    found = soak.classify_inferences(entries)
    assert found.inferred_more_than_once == ["again", "twice"]
    assert found.rerun_after_fault == []
    assert found.other_repeats == ["unknown"]
    assert found.per_task["once"] == ["succeeded"]


def test_logs_without_the_inferred_field_are_noticed():
    found = soak.classify_inferences([{"task_id": "t", "outcome": "succeeded"}])
    assert not found.flag_seen and found.per_task == {}


def test_fault_moments_are_distinct_inside_the_window_and_repeat_with_the_seed():
    counts = {"kill9": 2, "sigterm": 1, "postgres_restart": 1}
    plans = [soak.plan_faults(random.Random(7), 180, counts) for _ in range(2)]
    assert plans[0] == plans[1]
    triggers = [f.trigger for f in plans[0]]
    assert len(set(triggers)) == 4 and triggers == sorted(triggers)
    assert all(9 <= t <= 162 for t in triggers)  # 5 % .. 90 % of 180
    assert sorted(f.kind for f in plans[0]) == ["kill9", "kill9", "postgres_restart", "sigterm"]


def test_a_fault_waiting_for_its_moment_holds_back_publishing_so_it_fires_with_work_left():
    """A daemon faster than the soak's poll once finished all 180 tasks before the last
    two faults fired: publishing now waits for each fault."""
    valid = [i % 10 != 0 for i in range(110)]  # 99 valid, every tenth poison
    early, late = soak.Fault("kill9", 0.3, 30), soak.Fault("sigterm", 0.95, 95)

    upto = soak.publishable(valid, [early, late], 0, 0, window=200)
    assert sum(valid[:upto]) == 30 + soak.FAULT_LEAD  # held back until the kill fires
    assert soak.publishable(valid, [early, late], upto, upto, window=200) == upto

    early.fired_at_s, early.fired_at_succeeded = 3.0, 31
    upto = soak.publishable(valid, [early, late], upto, upto, window=200)
    assert sum(valid[:upto]) == 98  # the last valid task waits for the late fault
    late.fired_at_s, late.fired_at_succeeded = 9.0, 98
    assert soak.publishable(valid, [early, late], upto, upto, window=200) == 110
    assert soak.publishable(valid, [], 0, 5, window=40) == 45  # no faults: the window only


def test_a_fault_due_right_after_another_can_still_fire():
    """The next fault fires only once more was committed than at the last one, so one
    more valid task must go out even when the first fired past the second's moment."""
    valid = [True] * 50
    first, second = soak.Fault("kill9", 0.5, 25), soak.Fault("postgres_restart", 0.52, 26)
    first.fired_at_s, first.fired_at_succeeded = 4.0, 49  # fired late, everything done
    assert soak.publishable(valid, [first, second], 49, 49, window=100) == 50


def test_each_poison_kind_is_a_valid_body_with_its_one_thing_wrong_drawn_from_the_seed():
    """What the daemon must find wrong with each kind is all that is wrong with it, and
    the bodies the daemon can identify are the ones the soak expects a failed row for."""
    messages = soak.build_workload(random.Random(7), TENANTS, ASSETS, 240, 0.5)
    again = soak.build_workload(random.Random(7), TENANTS, ASSETS, 240, 0.5)
    assert messages == again
    assert {m.kind for m in messages} == {soak.VALID, *soak.POISON_KINDS}
    assert len({m.task_id for m in messages}) == len(messages)
    limit = ASSETS.max_body_bytes
    for message in messages:
        refused_by_parse = {"bad_json", "oversized_body", "unknown_field", "bad_tenant_id"}
        if message.kind in refused_by_parse:
            with pytest.raises(PermanentError) as err:
                parse_task(message.body, limit)
            assert err.value.code == message.expected_code, message
        else:
            task = parse_task(message.body, limit)
            assert (task.task_id, task.tenant_id) == (message.task_id, message.tenant)
        task_id, tenant = identify(message.body)
        if message.kind in {"bad_json", "bad_tenant_id"}:
            assert None in (task_id, tenant), message  # no row can be written
        elif message.kind == "oversized_body":
            assert message.kind in soak.NO_ROW  # identifiable, but never parsed for its ids
        else:
            assert (task_id, tenant) == (message.task_id, message.tenant), message
        if message.kind == "oversized_body":
            assert len(message.body) == limit + 1
            assert parse_task(message.body, limit + 1).tenant_id == TENANTS.own
        if message.kind == "unknown_tenant":
            assert message.tenant == TENANTS.unknown
            assert task.image_url == ASSETS.unknown_tenants_scene
        if message.kind == soak.OTHER_TENANTS_TASK_ID:
            assert message.task_id.startswith(f"{TENANTS.owner}-")
            assert message.tenant == TENANTS.own


def test_the_soaks_deployment_serves_its_tenant_and_the_owner_and_no_other(tmp_path):
    """What the file says. That a daemon serving it refuses the unknown tenant, the soak
    shows (its unknown_tenant dead letters): opening it here would cost seconds of imports."""
    path = soak.write_deployment(tmp_path / "deployment.yaml", TENANTS)
    deployment = DeploymentConfig.model_validate(yaml.safe_load(path.read_text()))
    assert deployment.tenants == {TENANTS.own: "demo", TENANTS.owner: "demo"}
    assert deployment.default_industry is None  # so the unknown tenant is refused
    assert deployment.industries == {"demo": str(soak.DEMO_CONFIG)}
    assert soak.DEMO_CONFIG.is_file()


def test_poison_that_left_a_wrong_row_a_result_or_touched_the_owners_row_is_reported():
    messages = soak.build_workload(random.Random(3), TENANTS, ASSETS, 60, 0.5)
    by_kind = {m.kind: m for m in reversed(messages)}
    owned = {
        m.task_id: {"task_results": {"status": "succeeded"}}
        for m in messages
        if m.kind == soak.OTHER_TENANTS_TASK_ID
    }

    def row(message, status="failed", code=None, tenant=None):
        code = code or message.expected_code
        return soak.Row(status, 0.0, 1, tenant or message.tenant, code)

    rows = {m.task_id: row(m) for m in messages if not m.valid and m.kind not in soak.NO_ROW}
    assert soak.poison_effects(messages, rows, set(), owned, owned) == {}

    unknown, big = by_kind["unknown_tenant"], by_kind["oversized_body"]
    stolen = by_kind[soak.OTHER_TENANTS_TASK_ID]
    wrong_rows = {
        **rows,
        unknown.task_id: row(unknown, "succeeded", code="-"),
        stolen.task_id: row(stolen, code="task_id_conflict"),
        big.task_id: row(big),  # parsed for its ids after all
    }
    results = {f"{TENANTS.unknown}/{unknown.task_id}.json", f"{TENANTS.own}/{stolen.task_id}.json"}
    changed = {**owned, stolen.task_id: {"task_results": {"status": "failed"}}}
    found = soak.poison_effects(messages, wrong_rows, results, owned, changed)
    assert set(found) == {"unknown_tenant", "oversized_body", soak.OTHER_TENANTS_TASK_ID}
    assert any("result object" in p for p in found["unknown_tenant"])
    assert any("succeeded row" in p for p in found["unknown_tenant"])
    assert any("a failed row (body_too_large)" in p for p in found["oversized_body"])
    stolen_found = " ".join(found[soak.OTHER_TENANTS_TASK_ID])
    assert "result object" in stolen_found and "owner's row" in stolen_found
    assert "failed row (task_id_conflict) under tenant" in stolen_found


@pytest.mark.slow
def test_a_small_soak_loses_nothing_and_infers_nothing_twice(tmp_path, capsys):
    """200 tasks, a tenth of them poison (each of the twelve kinds at least once), the
    default faults (kill -9 twice, SIGTERM and a PostgreSQL restart once), a fixed seed."""
    report_path = tmp_path / "report.json"
    args = build_parser().parse_args(
        [
            "soak",
            "--tasks=200",
            "--poison=0.1",
            "--seed=7",
            "--settle-timeout-s=150",
            f"--state-dir={tmp_path}",
            f"--report={report_path}",
        ]
    )
    code = soak.main(args)
    out = capsys.readouterr().out
    report = json.loads(report_path.read_text())

    assert code == 0, out
    assert report["seed"] == 7 and report["valid"] == 180 and report["poison"] == 20
    assert report["lost"] == 0, report["lost_detail"]
    # Every task has a callback_url: each success's callback arrives, a killed daemon's
    # too (sent by the next daemon once the dead one's lease ends).
    assert report["callbacks_missing"] == []
    assert "successes never called back" in out
    assert report["inferred_more_than_once"] == []
    assert report["inferred_flag_in_logs"], "the daemons' log lines must say when they inferred"
    assert report["succeeded"] == 180
    assert report["poison_dead_lettered"] == 20
    assert report["unexpected_reasons"] == {}, "each kind of poison gets its own reason"
    assert report["poison_succeeded"] == []
    assert report["poison_wrong_effects"] == {}, "its failed row, or none; no result"
    assert sum(report["dead_letters_by_code"].values()) >= 20
    assert set(report["poison_kinds"]) == set(soak.POISON_KINDS)
    fired = sorted(f["kind"] for f in report["faults"] if f["fired_at_s"] is not None)
    assert fired == ["kill9", "kill9", "postgres_restart", "sigterm"]
    assert report["daemons_started"] == 4  # the first, and one after each kill and SIGTERM
    assert report["unexpected_daemon_exits"] == []
    assert report["peak_rss_mib"] > 0 and report["valid_per_s"] > 0
    # 180 tasks over four daemons: too few to read a growth from, and said so.
    assert report["rss_growth_mib_per_1000_tasks"] is None
    assert "RSS growth, second half" in out and "fewer than 1000 tasks" in out
    assert "OK: 0 lost, 0 inferred more than once." in out


def test_memory_growth_is_read_over_the_second_half_of_a_daemons_tasks():
    """The peak says little of a leak until it is large; the slope of resident memory
    against tasks done, after the warm-up, says it early. A daemon that grows 64 MiB
    while warming and then leaks 5 KiB a task reads about 4.9 MiB per 1000 tasks; one
    that only warms reads about nothing; too short a run reads nothing at all."""
    warm = [(n, 600_000 + min(n, 500) * 131) for n in range(0, 4001, 40)]
    leaking = [(n, kib + max(0, n - 500) * 5) for n, kib in warm]
    noisy = [(n, kib + (17 if n % 80 else -17)) for n, kib in warm]
    assert soak.rss_growth_mib_per_1000(leaking) == pytest.approx(5000 / 1024, abs=0.01)
    assert abs(soak.rss_growth_mib_per_1000(noisy) or 0.0) < 0.05
    assert soak.rss_growth_mib_per_1000(warm[:40]) is None  # 1560 tasks: a half of 780
    assert soak.rss_growth_mib_per_1000([]) is None
