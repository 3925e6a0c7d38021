"""The wheel carries the Lua scripts and works outside the source tree."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT_FROM_INSTALLED_WHEEL = """
import sys, redis, outbox
from outbox.store import Outbox
assert "site-packages" in outbox.__file__, outbox.__file__
box = Outbox(redis.Redis.from_url(sys.argv[1]), "wheel.check.events")
box.push([b"entry"])
claim = box.claim(batch_size=10, lease_ms=1000)
assert [lease.payload for lease in claim.leases] == [b"entry"], claim
assert box.ack(claim.leases) == [True]
print("claimed and acked from", outbox.__file__)
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    [built] = out.glob("redis_outbox-*.whl")
    return built


@pytest.mark.slow
def test_wheel_contains_every_lua_script(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for script in sorted((ROOT / "lua").glob("*.lua")):
        assert f"outbox/lua/{script.name}" in names
    assert "outbox/py.typed" in names


@pytest.mark.slow
def test_installed_wheel_runs_scripts_outside_source_tree(wheel, tmp_path, redis_url):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )

    result = subprocess.run(
        [str(python), "-c", SCRIPT_FROM_INSTALLED_WHEEL, redis_url],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert "claimed and acked" in result.stdout
