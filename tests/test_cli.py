"""Invalid options and environment variables end with exit status 2 and a clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run_drain(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "outbox.drain", "--once", *args],
        capture_output=True, text=True, timeout=30, env=environment,
    )


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {"OUTBOX_ONCE": "maybe"}, "OUTBOX_ONCE must be 1, true, yes or on"),
        ([], {"OUTBOX_LOG_FORMAT": "xml"}, "invalid choice 'xml'"),
        ([], {"OUTBOX_BATCH_SIZE": "many"}, "OUTBOX_BATCH_SIZE must be an integer"),
        (["--redis-url", "notaurl"], {}, "invalid --redis-url (env OUTBOX_REDIS_URL) 'notaurl'"),
        (["--redis-url", "redis://127.0.0.1:1/abc"], {}, "URL path '/abc' is not a database number"),
        (["--amqp-url", "notaurl"], {}, "invalid AMQP URL 'notaurl'"),
        (["--amqp-url", "http://127.0.0.1/"], {}, "invalid AMQP URL"),
        (["--max-message-bytes", "0"], {}, "--max-message-bytes must be from 1 to 536870912"),
        (["--max-message-bytes", "999999999999"], {}, "--max-message-bytes must be from 1 to"),
        (["--max-outage-s", "-1"], {}, "--max-outage-s must be a finite number, 0 or more"),
        (["--max-outage-s", "inf"], {}, "--max-outage-s must be a finite number, 0 or more"),
        (["--lease-ms", "5"], {}, "lease must be from 100 ms to one day"),
        (["--lease-ms", "99999999999999999999"], {}, "lease must be from 100 ms to one day"),
        (["--retry-delay-ms", "86400001"], {}, "retry delay must be from 0 to one day"),
        (["--connect-timeout-s", "inf"], {}, "connect_timeout_s must be more than 0 and at most"),
        (["--connect-timeout-s", "1e308"], {}, "connect_timeout_s must be more than 0 and at most"),
        (["--confirm-timeout-s", "nan"], {}, "confirm_timeout_s must be more than 0 and at most"),
        (["--metrics-port", "70000"], {}, "--metrics-port must be a port from 1 to 65535"),
        (["--outbox", ""], {}, "--outbox contains an empty outbox name"),
        (["--outbox", "acme.a.events,"], {}, "--outbox contains an empty outbox name"),
        ([], {"OUTBOX_OUTBOXES": ",,"}, "OUTBOX_OUTBOXES contains an empty outbox name"),
        ([], {"OUTBOX_OUTBOXES": "acme.a.events,,acme.b.events"}, "an empty outbox name"),
    ],
    ids=["once-word", "log-format", "batch-size-word", "redis-url", "redis-db-word", "amqp-url", "amqp-scheme",
         "max-message-bytes", "max-message-bytes-huge", "max-outage", "max-outage-inf", "lease", "lease-huge", "retry-delay-huge", "connect-timeout-inf",
         "connect-timeout-huge",
         "confirm-timeout-nan", "metrics-port", "outbox-empty", "outbox-list-gap",
         "outboxes-env-empty",
         "outboxes-env-gap"],
)
def test_invalid_drain_option_exits_2_with_message(redis_url, args, env, message):
    result = run_drain(["--redis-url", redis_url, *args], env)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_redacted_amqp_url_hides_the_password(redis_url):
    result = run_drain(["--redis-url", redis_url, "--amqp-url", "http://user:secret@127.0.0.1/"])
    assert "secret" not in result.stderr


def test_requeue_of_unknown_id_exits_1_naming_it(redis_url, redis_client):
    from outbox.store import Outbox

    Outbox(redis_client, "acme.cli.events").push([b"x"])
    result = subprocess.run(
        [sys.executable, "-m", "outbox", "dead", "requeue", "424242", "--redis-url", redis_url,
         "--outbox", "acme.cli.events"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert "not dead letters of outbox acme.cli.events: 424242" in result.stderr


def test_dead_purge_rejects_ids_with_all(redis_url, redis_client):
    from outbox.store import Outbox

    Outbox(redis_client, "acme.cli.events").push([b"x"])
    result = subprocess.run(
        [sys.executable, "-m", "outbox", "dead", "purge", "1", "--all", "--yes", "--redis-url",
         redis_url, "--outbox", "acme.cli.events"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "not both" in result.stderr


@pytest.mark.parametrize("limit", ["0", "-2"])
def test_dead_list_rejects_limit_below_one(redis_url, limit):
    result = subprocess.run(
        [sys.executable, "-m", "outbox", "dead", "list", "--limit", limit, "--redis-url", redis_url],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert f"must be 1 or more, got {limit}" in result.stderr


def test_stats_splits_comma_separated_outboxes(redis_url, redis_client):
    from outbox.store import Outbox

    Outbox(redis_client, "acme.one.events").push([b"x"])
    Outbox(redis_client, "acme.two.events").push([b"x", b"y"])
    result = subprocess.run(
        [sys.executable, "-m", "outbox", "stats", "--json", "--outbox",
         "acme.one.events,acme.two.events", "--redis-url", redis_url],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    outboxes = json.loads(result.stdout)["outboxes"]
    pending = {name: counts["pending"] for name, counts in outboxes.items()}
    assert pending == {"acme.one.events": 1, "acme.two.events": 2}


def test_unknown_outbox_name_exits_1_naming_it(redis_url, redis_client):
    from outbox.store import Outbox

    Outbox(redis_client, "acme.cli.events").push([b"x"])
    result = subprocess.run(
        [sys.executable, "-m", "outbox", "stats", "--outbox", "acme.cli.evnets", "--redis-url",
         redis_url],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert "outbox 'acme.cli.evnets' not found" in result.stderr
    assert "outboxes found: acme.cli.events" in result.stderr
