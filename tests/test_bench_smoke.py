"""Smoke test of ``python -m bench --quick``: it runs, prints ratios and cleans up after itself."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pika
import pika.exceptions
import pytest

ROOT = Path(__file__).resolve().parent.parent
RATIO_ROW = re.compile(r"^\| drain \| .* \| (\d+\.\d\d) \| .* \|$", re.MULTILINE)


@pytest.mark.slow
def test_quick_bench_prints_ratios_and_cleans_up(tmp_path: Path, amqp_url: str) -> None:
    results_file = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(results_file)],
        cwd=ROOT,
        env={**os.environ, "OUTBOX_TEST_AMQP_URL": amqp_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "| ratio |" in completed.stdout
    match = RATIO_ROW.search(completed.stdout)
    assert match is not None, completed.stdout
    assert float(match.group(1)) > 0

    results = json.loads(results_file.read_text())
    names = {ratio["name"] for ratio in results["ratios"]}
    assert {"drain", "drain-mixed", "redis", "bus, RabbitMQ up", "bus, RabbitMQ down"} <= names
    assert all(ratio["rate"] > 0 and ratio["baseline_rate"] > 0 for ratio in results["ratios"])
    assert results["memory"][0]["small_peak_mib"] > 0

    # The private redis-server is stopped and the queues and exchanges are deleted.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", results["settings"]["redis_port"]), timeout=1)
    declared = results["settings"]["rabbitmq_names_deleted"]
    assert declared["queues"] and declared["exchanges"]
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        for queue in declared["queues"]:
            channel = connection.channel()
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
                channel.queue_declare(queue, passive=True)
            assert closed.value.reply_code == 404
        for exchange in declared["exchanges"]:
            channel = connection.channel()
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
                channel.exchange_declare(exchange, passive=True)
            assert closed.value.reply_code == 404
    finally:
        connection.close()
