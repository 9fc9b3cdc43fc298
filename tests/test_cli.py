"""The `gannet` command as a user meets it: help, settings, clear start-up errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import SAMPLES, SCENES, gannet
from tcp_relay import relay_to

from gannet import sink
from gannet.settings import REPO_ROOT, settings_table
from gannet.sink import SCHEMA_VERSION


def test_help_lists_every_command():
    out = gannet("--help")
    assert out.returncode == 0
    for command in (
        "run",
        "publish",
        "demo",
        "bench",
        "soak",
        "db",
        "services",
        "settings",
        "ops",
        "scaling",
        "dead-letters",
        "config",
    ):
        assert f"    {command}" in out.stdout


def test_readme_settings_table_matches_the_code():
    readme = (REPO_ROOT / "README.md").read_text()
    assert settings_table() in readme, "regenerate with `gannet settings --markdown`"


def test_run_without_credentials_or_emulator_says_what_to_do():
    env = {
        k: ""
        for k in (
            "GANNET_PUBSUB_EMULATOR_HOST",
            "PUBSUB_EMULATOR_HOST",
            "GANNET_STORAGE_EMULATOR_HOST",
        )
    }
    out = gannet(
        "run",
        env={
            **env,
            "GANNET_METRICS_PORT": "0",
            "GOOGLE_APPLICATION_CREDENTIALS": "",
            "CLOUDSDK_CONFIG": "/nonexistent",
        },
        timeout=120,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "no Google Cloud credentials" in out.stdout and "gannet services" in out.stdout


def test_migrate_without_a_database_waits_then_says_what_to_do():
    """The pod's migrate step starts beside a proxy sidecar: it waits as the daemon does
    (GANNET_DB_CONNECT_WAIT_S), then says what to check instead of a traceback."""
    out = gannet(
        "db",
        "migrate",
        env={
            "GANNET_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
            "GANNET_DB_CONNECT_WAIT_S": "0.5",
        },
        timeout=120,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "cannot connect to PostgreSQL" in out.stderr and "Traceback" not in out.stderr
    assert "GANNET_DB_CONNECT_WAIT_S" in out.stderr


# A daemon whose services are all unreachable: it stops at the database, 0.5 s in.
NOWHERE = {
    "GANNET_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
    "GANNET_DB_CONNECT_WAIT_S": "0.5",
    "GANNET_PUBSUB_EMULATOR_HOST": "127.0.0.1:1",
    "GANNET_STORAGE_EMULATOR_HOST": "http://127.0.0.1:1",
    "GANNET_METRICS_PORT": "0",
}


def test_a_stop_signal_during_start_up_ends_the_daemon_at_once():
    """Before its streams open a daemon has leased nothing, so there is nothing to
    drain: a SIGTERM there (a rollout replacing a pod still loading its models) waited
    for the start-up to end, a second signal ignored too, past the pod's grace, where
    the kubelet's SIGKILL ended it without a word. Here the start-up waits for a
    database that is not there (60 s)."""
    import signal
    import subprocess
    import sys
    import urllib.request

    from gannet.dev.local_services import free_port

    port = free_port()
    env = {**NOWHERE, "GANNET_DB_CONNECT_WAIT_S": "60", "GANNET_METRICS_PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gannet", "run"],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # /healthz answers once the signal handlers are in place
            assert time.monotonic() < deadline and proc.poll() is None
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        time.sleep(0.5)  # well inside the database wait
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert time.monotonic() - stopped < 5
        assert "stop requested during start-up; exiting now" in out
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_run_without_a_database_says_what_to_do():
    """After GANNET_DB_CONNECT_WAIT_S (15 s by default, 0.5 here), not at once."""
    started = time.monotonic()
    out = gannet("run", env=NOWHERE, timeout=120)
    assert out.returncode == 2
    assert "cannot connect to PostgreSQL" in out.stdout and "GANNET_DATABASE_URL" in out.stdout
    assert "GANNET_DB_CONNECT_WAIT_S" in out.stdout
    assert time.monotonic() - started < 15  # the setting, not the default, was waited out


def test_run_against_an_unmigrated_database_says_to_migrate(services):
    import psycopg

    with psycopg.connect(services.admin_url, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS empty")
        conn.execute("CREATE DATABASE empty OWNER gannet")
    out = gannet(
        "run",
        env={**services.env(), **services.database_env("empty"), "GANNET_METRICS_PORT": "0"},
        timeout=120,
    )
    assert out.returncode == 2 and "gannet db migrate" in out.stdout


def test_a_database_that_stops_answering_the_start_up_checks_is_a_sentence(services):
    """PostgreSQL accepts the pool's connections, then stops answering at the start-up's
    check of the daemon's role (a relay frozen as that statement goes by): the start
    ends at the answer deadline with a sentence and exit code 2. It waited for good,
    with no log line, until a pod's startup probe killed it; a blip there instead was
    a traceback."""
    relay, through = relay_to(services.database_url)
    relay.freeze_on(b"rolbypassrls")  # in the role check's text (sink._ROLE)
    try:
        out = gannet(
            "run",
            env={
                **services.env(),
                "GANNET_DATABASE_URL": through,
                "GANNET_DB_ANSWER_DEADLINE_S": "2",
                "GANNET_METRICS_PORT": "0",
            },
            timeout=60,
        )
    finally:
        relay.thaw()
        relay.close()
    assert out.returncode == 2, out.stdout + out.stderr
    assert "PostgreSQL stopped answering the start-up's checks" in out.stdout
    assert "gave no answer within 2 s" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


def test_a_config_address_that_names_no_object_stops_the_start_with_a_sentence(services):
    """GANNET_CONFIG_URI of a bucket without the config's path (a slash too few) was a
    traceback at start; it is the start-up's sentence and exit code 2."""
    out = gannet(
        "run",
        env={
            **services.env(),
            "GANNET_CONFIG_URI": "gs://gannet-models",
            "GANNET_METRICS_PORT": "0",
        },
        timeout=60,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "cannot load GANNET_CONFIG_URI: 'gs://gannet-models': it names no object" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


@pytest.mark.parametrize("unbuffered", ["1", None])
def test_a_reader_that_goes_away_leaves_no_traceback(unbuffered):
    """`gannet settings | head -1`: head exits after its line, and the rest of the
    output went to a closed pipe as a BrokenPipeError traceback on the terminal. Here
    the pipe is closed before the command writes anything, its output written at once
    (PYTHONUNBUFFERED) or at the end, as Python buffers a pipe by default."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    proc = subprocess.Popen(
        [sys.executable, "-m", "gannet", "settings"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141, err
    assert err == ""


# A command whose own connection's pipe broke (a stand-in: settings made to raise it),
# with its standard output read to the end.
OWN_PIPE_BROKE = """
import sys
from gannet import cli
def broke(args):
    raise BrokenPipeError(32, "Broken pipe (the command's own socket)")
cli.cmd_settings = broke
sys.exit(cli.main(["settings"]))
"""


def test_a_broken_pipe_of_the_commands_own_is_an_error_not_a_reader_gone():
    """Only standard output's reader going away ends a command quietly (141): the same
    error from a connection of the command's own is a failure and shows its traceback."""
    done = subprocess.run(
        [sys.executable, "-c", OWN_PIPE_BROKE], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done.stderr
    assert "BrokenPipeError: [Errno 32] Broken pipe (the command's own socket)" in done.stderr


def test_bench_options_of_another_mode_are_refused_not_ignored():
    """Each bench mode reads its own options: one given to a mode that would not apply
    it (a GCS latency to the model bench, a baseline to --in-process, an image count to
    --flood) is refused before anything starts, saying which mode it goes with, instead
    of a run whose figures are not what was asked for; so are two modes at once."""
    refusals = (
        (["--gcs-latency-ms", "20"], "--gcs-latency-ms goes with --plumbing, not with the model"),
        (["--gcs-tls"], "--gcs-tls goes with --plumbing"),
        (["--baseline", "plumbing-baseline"], "--baseline goes with --plumbing"),
        (["--sizes", "4032x3024"], "--sizes goes with --plumbing or --in-process"),
        (["--in-process", "--pubsub-latency-ms", "5"], "not with --in-process"),
        (["--in-process", "--baseline", "HEAD"], "--baseline goes with --plumbing"),
        (["--plumbing", "--device", "cuda:0"], "--device goes with --in-process"),
        (["--flood", "--images", "50"], "--images goes with the model bench"),
        (["--flood", "--no-gil"], "--no-gil goes with --plumbing"),
        (["--plumbing", "--lanes", "a:1"], "--lanes goes with --flood"),
        (["--in-process", "--plumbing"], "--plumbing and --in-process are modes of their own"),
        (["--plumbing", "--flood"], "--plumbing and --flood are modes of their own"),
        # Values that crashed after the services had started, or were replaced in silence.
        (["--rounds", "0"], "--rounds: 0 is not a positive number"),
        (["--images", "-1"], "--images: -1 is not a positive number"),
        (["--runners", "0"], "--runners: 0 is not a positive number"),
        (["--flood", "--spacing", "-1"], "--spacing: -1 is negative"),
        (["--flood", "--lanes", "foo"], "--lanes 'foo': "),
        (["--pubsub-port", "70000"], "70000 is not a port (1-65535)"),
        (["--gcs-port", "8085"], "--pubsub-port, --gcs-port and --postgres-port must differ"),
    )
    pipeline = ["--plumbing", "--pipeline", "configs/agro.yaml:FULL_PIPELIN"]
    sweep = ["--plumbing", "--runners-sweep", "4,2:0"]
    # Sixteen commands, a Python each: side by side, not one after another (the
    # --pipeline one, which reads the config, takes longest: it goes first).
    commands = [pipeline, sweep, *(options for options, _ in refusals)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        pipeline_out, sweep_out, *outs = pool.map(lambda args: gannet("bench", *args), commands)
    for (options, expected), out in zip(refusals, outs, strict=True):
        assert out.returncode == 2, options
        assert expected in out.stdout + out.stderr, options
    assert sweep_out.returncode == 2
    assert "not a positive number" in sweep_out.stderr
    assert pipeline_out.returncode == 2
    assert "known: DETECTION, FIELD_ANALYSIS, FULL_PIPELINE" in (
        pipeline_out.stdout + pipeline_out.stderr
    )


PUBLISH = ("publish", "--tenant", "acme", "--pipeline", "DETECTION")


def test_publish_refuses_two_files_that_would_be_one_object(tmp_path):
    """Two local files of one name went to one object, gs://B/T/uploads/NAME, and both
    tasks ran on the second's image, without a word. Refused before anything is sent."""
    for folder, scene in (("a", SCENES[0]), ("b", SCENES[1])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.jpg").write_bytes((SAMPLES / scene["file"]).read_bytes())
    out = gannet(*PUBLISH, str(tmp_path / "a" / "x.jpg"), str(tmp_path / "b" / "x.jpg"))
    assert out.returncode == 2
    assert "would both upload to gs://gannet-images/acme/uploads/x.jpg: rename one" in out.stderr


def test_publish_to_services_that_are_not_running_says_so_at_once():
    """With `gannet services`' exports set and the services stopped, the upload gave up
    after 44 s and the publish after 60 s, each blaming a bucket or topic."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]  # nothing listens on it
    started = time.monotonic()
    out = gannet(
        *PUBLISH,
        "gs://gannet-images/acme/x.jpg",
        env={
            "GANNET_PUBSUB_EMULATOR_HOST": f"127.0.0.1:{closed}",
            "GANNET_STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{closed}",
        },
    )
    assert out.returncode == 2
    assert f"nothing listens on 127.0.0.1:{closed} (GANNET_PUBSUB_EMULATOR_HOST)" in out.stderr
    assert "is `gannet services` running?" in out.stderr
    assert time.monotonic() - started < 20


def test_bench_in_process_refuses_an_unknown_image_set_before_it_starts():
    """As --plumbing does: a typo in --sizes says what would work instead of a
    traceback after the models have loaded."""
    out = gannet("bench", "--in-process", "--sizes", "640x480, 4032x302")
    assert out.returncode == 2
    assert "unknown image set 4032x302; choose from 640x480," in out.stdout + out.stderr


def test_settings_hides_the_database_password():
    """`gannet settings` is what an operator runs in a pod to see its configuration;
    its output ends up in tickets and chat, so the password must not be in it."""
    url = "postgresql://gannet:s3cr3t-pw@10.0.0.5:5432/gannet?sslmode=require"
    out = gannet("settings", env={"GANNET_DATABASE_URL": url})
    assert out.returncode == 0, out.stderr
    assert "s3cr3t-pw" not in out.stdout
    assert "GANNET_DATABASE_URL=postgresql://gannet:***@10.0.0.5:5432/gannet" in out.stdout
    kv = "host=10.0.0.5 dbname=gannet user=gannet password=s3cr3t-pw"
    out = gannet("settings", env={"GANNET_DATABASE_URL": kv})
    assert "s3cr3t-pw" not in out.stdout and "password=***" in out.stdout
    key = "callback-signing-key-" + "x" * 20
    out = gannet("settings", env={"GANNET_CALLBACK_SIGNING_KEY": key})
    assert key not in out.stdout
    assert "# GANNET_CALLBACK_SIGNING_KEY is set (not shown)" in out.stdout


def test_settings_print_lines_an_environment_can_take_back():
    """An operator copies `gannet settings` into a ConfigMap or a shell: a list was
    printed as Python's ['a', 'b'] and an unset setting as None, neither of which reads
    back as what was printed. Every line taken back as the environment prints the same."""
    out = gannet("settings", env={"GANNET_ALLOWED_BUCKETS": "images-a,images-b"})
    assert out.returncode == 0, out.stderr
    assert "GANNET_ALLOWED_BUCKETS=images-a,images-b" in out.stdout.splitlines()
    assert any(
        line.startswith("# GANNET_DB_POOL_SIZE is unset") for line in out.stdout.splitlines()
    )
    lines = [line for line in out.stdout.splitlines() if line and not line.startswith("#")]
    env = dict(line.split("=", 1) for line in lines)
    again = gannet("settings", env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout == out.stdout


def test_settings_print_what_a_setting_that_follows_others_comes_to():
    """`gannet settings` prints the effective values: the daemon reads its config from
    gs://MODELS_BUCKET/INDUSTRY/config.yaml when only those two are set, yet the demo's
    local config was printed; and an unset pool size or lease was only "unset"."""
    env = {"GANNET_INDUSTRY": "retail", "GANNET_MODELS_BUCKET": "models-eu", "GANNET_RUNNERS": "3"}
    out = gannet("settings", env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "# GANNET_CONFIG_URI is unset: gs://models-eu/retail/config.yaml" in out.stdout
    assert not any(line.startswith("GANNET_CONFIG_URI=") for line in lines)
    assert "# GANNET_DB_POOL_SIZE is unset: 7 (GANNET_RUNNERS + 4)" in lines
    assert any(line.startswith("# GANNET_MAX_MESSAGES is unset: 6 per lane") for line in lines)
    assert "# GANNET_CONFIG_CHECK_S is unset: 30 s (a gs:// config)" in lines
    # Without them, the config is the setting's own (the demo's file), checked by stat.
    local = gannet("settings", env={"GANNET_RUNNERS": "3"}).stdout.splitlines()
    assert f"GANNET_CONFIG_URI={REPO_ROOT / 'configs' / 'demo.yaml'}" in local
    assert "# GANNET_CONFIG_CHECK_S is unset: 5 s (a local config)" in local


def test_a_refused_setting_is_named_as_the_operator_wrote_it():
    """pydantic named the field (`runners`), appended its documentation link and type
    names; the operator wrote GANNET_RUNNERS in a ConfigMap: each refused variable is a
    line with its name, its value and why, for `gannet run` as for any command."""
    env = {"GANNET_RUNNERS": "0", "GANNET_LANES": "bad::x"}
    for command in ("settings", "run"):
        out = gannet(command, env=env)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert lines[0] == "error: a GANNET_* setting is not valid:"
        assert "GANNET_RUNNERS='0': Input should be greater than or equal to 1" in lines
        assert any(line.startswith("GANNET_LANES='bad::x': lane 'bad::x'") for line in lines)
        assert "pydantic.dev" not in out.stderr


def test_settings_that_would_fail_every_task_or_the_start_are_refused_up_front():
    """Values that started a daemon failing every task (a body or image limit of 0 or
    less: each valid task dead-lettered as too large; no allowed bucket: each refused),
    or that crashed it with a traceback after its models loaded (a log level logging
    does not know, a port past 65535, more runner threads than a process can start):
    each refused at once, as a line naming the variable, its value and why."""
    env = {
        "GANNET_MAX_BODY_BYTES": "-5",
        "GANNET_MAX_IMAGE_BYTES": "0",
        "GANNET_MAX_IMAGE_PIXELS": "0",
        "GANNET_ALLOWED_BUCKETS": " , ",
        "GANNET_LOG_LEVEL": "verbose",
        "GANNET_METRICS_PORT": "70000",
        "GANNET_RUNNERS": "100000",
    }
    out = gannet("run", env=env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    refused = {line.split("=", 1)[0] for line in out.stderr.splitlines()[1:]}
    assert refused == set(env), out.stderr
    assert "GANNET_LOG_LEVEL='verbose': one of CRITICAL, FATAL, ERROR, WARN, WARNING" in out.stderr
    assert "GANNET_ALLOWED_BUCKETS=' , ': name at least one bucket" in out.stderr
    for level in ("debug", "WARNING", "WARN"):  # any case, and logging's other names
        assert gannet("settings", env={"GANNET_LOG_LEVEL": level}).returncode == 0


def test_a_database_url_that_is_not_one_says_so_at_once():
    """A GANNET_DATABASE_URL libpq cannot parse was taken for a database not up yet:
    the wait, then `is it running?`."""
    env = {"GANNET_DATABASE_URL": "nonsense", "GANNET_DB_CONNECT_WAIT_S": "60"}
    started = time.monotonic()
    out = gannet("db", "migrate", env=env, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "GANNET_DATABASE_URL='nonsense': not a PostgreSQL URL" in out.stderr
    assert "postgresql://USER:PASSWORD@HOST:PORT/DATABASE" in out.stderr
    assert "is it running" not in out.stderr and "Traceback" not in out.stderr
    assert time.monotonic() - started < 30
    for url in (
        "postgresql://g:s3cret@h/db?nosuch=1",
        "postgresql://g:s3cret@[h/db",  # libpq quotes the URL
        "postgresql://g:s3cret%zz@h/db",  # libpq quotes the password
        "postgresql://g:s3cret two@h/db",
        "postgresql://g@h/db?password=s3cret%zz",
    ):
        out = gannet("settings", env={"GANNET_DATABASE_URL": url})
        assert out.returncode == 2 and "not a PostgreSQL URL" in out.stderr, url
        assert "s3cret" not in out.stderr, "the refusal shows the URL without its password"


def test_run_with_its_metrics_port_taken_says_so():
    """A second `gannet run` on one machine, or a port another process holds: one
    sentence naming the setting, not a traceback."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = gannet("run", env={"GANNET_METRICS_PORT": str(port)}, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["severity"] == "CRITICAL"
    assert f"port {port}" in line["message"] and "GANNET_METRICS_PORT" in line["message"]


@pytest.mark.parametrize(
    ("refusal", "said"),
    [
        (
            "a misspelt database",
            [
                'database "no_such_db" does not exist',
                "check the user, password and database name in GANNET_",  # its URL's
            ],
        ),
        ("TLS asked of a server without it", ["server does not support SSL", "sslmode"]),
    ],
)
def test_a_database_that_answers_and_refuses_is_said_at_once(services, refusal, said):
    """A database that answers and refuses (a misspelt database or role, a wrong
    password; sslmode=require against a server or proxy that speaks no TLS) will not
    accept a retry either: the operator gets the server's reason and what to check at
    once, not after GANNET_DB_CONNECT_WAIT_S and not `is it running?` (as the TLS case
    was answered)."""
    url = services.database_url
    if refusal == "a misspelt database":
        url = url.rsplit("/", 1)[0] + "/no_such_db"
    else:
        url += "?sslmode=require"
    env = {
        **services.env(),
        "GANNET_DATABASE_URL": url,
        "GANNET_OWNER_DATABASE_URL": url,  # `db migrate` connects with it
        "GANNET_DB_CONNECT_WAIT_S": "60",
        "GANNET_METRICS_PORT": "0",
    }
    for command in (["run"], ["db", "migrate"]):
        started = time.monotonic()
        out = gannet(*command, env=env, timeout=120)
        assert out.returncode == 2, out.stdout + out.stderr
        # the daemon's last log line, or the migrate command's error line
        line = json.loads(out.stdout.splitlines()[-1])["message"] if out.stdout else out.stderr
        assert all(words in line for words in said), line
        if refusal == "a misspelt database":  # the setting whose URL was refused
            owners = command == ["db", "migrate"]
            setting = "GANNET_OWNER_DATABASE_URL" if owners else "GANNET_DATABASE_URL"
            assert f"database name in {setting}," in line
        assert "is it running" not in line and "Traceback" not in line
        assert time.monotonic() - started < 30  # not the 60 s wait


def test_migrate_as_a_role_that_may_not_create_tables_says_what_to_grant(services):
    """A database whose schema the URL's role may not create in (PostgreSQL 15 grants
    CREATE on `public` to its owner only): the migrate step printed a traceback
    (InsufficientPrivilege). It says what failed, why, that it was rolled back, and
    what the role needs; and it prints the database's schema version."""
    import psycopg

    with psycopg.connect(services.admin_url, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS not_gannets")
        conn.execute("CREATE DATABASE not_gannets")  # owned by the admin, not gannet
    out = gannet("db", "migrate", env={**services.env(), **services.database_env("not_gannets")})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert "creating the migrations' table failed" in out.stderr
    assert "permission denied for schema public" in out.stderr
    assert "rolled back" in out.stderr and "may create in its schema public" in out.stderr

    # After an image rollback the database is ahead of this gannet: both are said.
    with psycopg.connect(services.admin_url, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS rolled_back")
        conn.execute("CREATE DATABASE rolled_back OWNER gannet")
    env = {**services.env(), **services.database_env("rolled_back")}
    assert gannet("db", "migrate", env=env).returncode == 0
    with psycopg.connect(env["GANNET_OWNER_DATABASE_URL"], autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations (version) VALUES (99)")
    out = gannet("db", "migrate", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"database schema at version 99 (this gannet's: {SCHEMA_VERSION})" in out.stdout


def test_run_with_a_misspelt_subscription_says_so_before_loading_the_models(stack):
    """Each start of a crash loop on a misspelt GANNET_SUBSCRIPTION loaded the models
    first (tens of seconds on a GPU pod) before finding the subscription missing."""
    out = stack.gannet("run", GANNET_SUBSCRIPTION="no-such-sub", GANNET_METRICS_PORT="0")
    assert out.returncode == 2, out.stdout + out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert "no-such-sub is not usable" in lines[-1]["message"]
    assert not any("owns gannet's tables" in line["message"] for line in lines)


def test_run_refuses_a_role_rls_does_not_bind_and_warns_of_one_that_owns_the_tables(stack):
    """The daemon's role decides whether row-level security keeps tenants apart. A
    superuser or BYPASSRLS role sees every tenant's rows whatever the tenant set: the
    daemon refuses to start, saying why. The tables' owner is bound but could turn the
    binding off: the daemon starts, with a warning naming the fix (how deployments
    before the owner's URL ran)."""
    import psycopg

    with psycopg.connect(stack.services.admin_url, autocommit=True) as conn:
        for made in ("rls_bypasser BYPASSRLS", "ungranted"):
            conn.execute(
                f"DO $$ BEGIN CREATE ROLE {made} LOGIN PASSWORD 'gannet';"
                " EXCEPTION WHEN duplicate_object THEN NULL; END $$"
            )
    sink.migrate(stack.services.owner_url, worker=sink.Login("rls_bypasser", None))
    bypasser = stack.services.database_url.replace("gannet_worker:", "rls_bypasser:")
    out = stack.gannet("run", GANNET_DATABASE_URL=bypasser, GANNET_METRICS_PORT="0")
    assert out.returncode == 2, out.stdout + out.stderr
    last = json.loads(out.stdout.splitlines()[-1])["message"]
    assert "role rls_bypasser is a superuser or has BYPASSRLS" in last, last

    # A role not granted its rows (the daemon's Secret changed, the owner's migration
    # not run with it): said at the start, not a traceback, nor a failure per task.
    ungranted = stack.services.database_url.replace("gannet_worker:", "ungranted:")
    out = stack.gannet("run", GANNET_DATABASE_URL=ungranted, GANNET_METRICS_PORT="0")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stdout + out.stderr
    last = json.loads(out.stdout.splitlines()[-1])["message"]
    assert "role ungranted may not do what the daemon does (SELECT on task_results" in last
    assert "`gannet db migrate` with GANNET_OWNER_DATABASE_URL" in last

    out = stack.gannet(
        "run",
        GANNET_DATABASE_URL=stack.services.owner_url,
        GANNET_SUBSCRIPTION="no-such-sub",  # then it stops, after the role's check
        GANNET_METRICS_PORT="0",
    )
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    warned = [line for line in lines if "owns gannet's tables" in line["message"]]
    assert warned and warned[0]["severity"] == "WARNING" and warned[0]["role"] == "gannet"
    assert "no-such-sub is not usable" in lines[-1]["message"]
    assert "check GANNET_PROJECT, GANNET_SUBSCRIPTION" in lines[-1]["message"]
    assert not any(line["message"] == "warming models" for line in lines)


@pytest.mark.parametrize("setting", ["GANNET_RESULTS_BUCKET", "GANNET_MODELS_BUCKET"])
def test_run_with_a_bucket_that_does_not_exist_refuses_to_start(stack, setting):
    """Every task writes its result to the results bucket: a misspelt
    GANNET_RESULTS_BUCKET used to start a ready pod whose every task was retried until
    dead-lettered, with no row, while the backlog grew and the HPA added pods. A
    misspelt GANNET_MODELS_BUCKET listed no tenant's own model, and every tenant was
    served the industry's model, as successes, without a word. Now the pod does not
    start, and says why."""
    out = stack.gannet("run", **{setting: "no-such-bucket"}, GANNET_METRICS_PORT="0")
    assert out.returncode == 2, out.stdout + out.stderr
    said = json.loads(out.stdout.splitlines()[-1])["message"]
    assert f"bucket no-such-bucket does not exist: create it, or correct {setting}" in said
    assert "gannet is ready" not in out.stdout


def test_run_with_a_dead_letter_topic_that_does_not_exist_says_so_at_start(stack):
    """Poison is quarantined to the dead-letter topic; a misspelt one was found by the
    first poison message, whose quarantine failed, so it was nacked again and again. The
    daemon now says so at start, naming the topic and the setting, and serves valid
    tasks meanwhile."""
    daemon = stack.start_daemon(GANNET_DEAD_LETTER_TOPIC="no-such-dlq")
    task = stack.task(stack.upload(SCENES[0]["file"]))
    stack.publish([task])
    assert stack.wait_rows([task.task_id])[task.task_id]["status"] == "succeeded"
    assert daemon.stop() == 0
    said = [
        json.loads(line)
        for line in daemon.log_path.read_text().splitlines()
        if "dead-letter topic" in line and line.startswith("{")
    ]
    assert said and said[0]["severity"] == "ERROR", said
    assert "topics/no-such-dlq does not exist" in said[0]["message"]
    assert "GANNET_DEAD_LETTER_TOPIC" in said[0]["message"]


def test_run_with_cuda_devices_on_a_machine_without_a_gpu_says_so(services):
    """GANNET_DEVICES=cuda where torch sees no GPU (a pod on a CPU node, a missing
    driver): one sentence naming the setting, not a C++ stack dump from torch."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = {**services.env(), "GANNET_DEVICES": "cuda", "GANNET_METRICS_PORT": "0"}
    out = gannet("run", env=env, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "frame #" not in out.stdout + out.stderr
    said = json.loads(out.stdout.splitlines()[-1])["message"]
    assert "GANNET_DEVICES=cuda" in said and "no CUDA device" in said


def test_a_misspelt_setting_is_named_not_ignored_silently():
    """A typo in a ConfigMap's variable name left its default in force, without a word.
    Kubernetes' service links (GANNET_WORKER_SERVICE_HOST, ..._PORT=tcp://...) are not
    settings either, and are not warned about."""
    env = {
        "GANNET_SUBSCRIPTON": "gannet-tasks-sub-eu",
        "GANNET_WORKER_SERVICE_HOST": "10.0.0.9",
        "GANNET_WORKER_PORT": "tcp://10.0.0.9:9090",
    }
    typos = {"GANNET_FOO": "1", "GANNET_RUNERS": "2", "GANNET_DB_URL": "postgresql://db/x"}
    out = gannet("settings", env={**env, **typos})
    assert out.returncode == 0
    assert "GANNET_SUBSCRIPTON is not a setting" in out.stderr
    assert "did you mean GANNET_SUBSCRIPTION?" in out.stderr
    assert "GANNET_RUNERS is not a setting and is ignored; did you mean GANNET_RUNNERS?" in (
        out.stderr
    )
    assert "GANNET_DB_URL is not a setting and is ignored; did you mean GANNET_DATABASE_URL?" in (
        out.stderr
    )
    # A name like none of them is not matched to one (GANNET_FOO was "GANNET_TOPIC?").
    assert "GANNET_FOO is not a setting and is ignored (`gannet settings` lists them)" in (
        out.stderr
    )
    assert "GANNET_WORKER" not in out.stderr
    # An operator's tools read the same variables: a replay would pull from the default.
    out = gannet("dead-letters", "--code", "nonsense", env=env)
    assert "did you mean GANNET_SUBSCRIPTION?" in out.stderr
    out = gannet("run", env={**env, **NOWHERE}, timeout=120)
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    warned = [line for line in lines if "GANNET_SUBSCRIPTON" in line["message"]]
    assert warned and warned[0]["severity"] == "WARNING"
    assert "did you mean GANNET_SUBSCRIPTION?" in warned[0]["message"]
