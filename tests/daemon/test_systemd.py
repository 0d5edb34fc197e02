"""sd_notify over real Unix datagram sockets, and the unit file as `systemd-analyze verify` sees it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from selftune.daemon.service.lifecycle import JournalFormatter
from selftune.daemon.service.systemd import Notifier

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "selftune.service"
INSTALLED_PATH = "/opt/selftune/.venv/bin/selftune"


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(tmp_path / "notify.sock")
    listener.bind(address)
    listener.settimeout(5)
    yield listener, address
    listener.close()


def test_messages_reach_a_path_socket(path_socket: tuple[socket.socket, str]) -> None:
    listener, address = path_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.ready("serving  on\nport 1")
    assert listener.recv(4096) == b"READY=1\nSTATUS=serving  on\nport 1"
    assert notifier.status("a\nmulti-line   status")
    assert listener.recv(4096) == b"STATUS=a multi-line status"
    assert notifier.watchdog() and listener.recv(4096) == b"WATCHDOG=1"
    assert notifier.stopping("bye") and listener.recv(4096) == b"STOPPING=1\nSTATUS=bye"


def test_messages_reach_an_abstract_socket() -> None:
    name = f"selftune-test-{uuid.uuid4().hex}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(b"\0" + name.encode())
    listener.settimeout(5)
    try:
        assert Notifier({"NOTIFY_SOCKET": f"@{name}"}).watchdog()
        assert listener.recv(4096) == b"WATCHDOG=1"
    finally:
        listener.close()


def test_without_systemd_every_call_is_a_quiet_no_op(tmp_path: Path) -> None:
    assert not Notifier({}).enabled and not Notifier({}).ready()
    assert not Notifier({"NOTIFY_SOCKET": "relative/path"}).enabled
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert gone.enabled and not gone.watchdog()  # a vanished supervisor is logged, never raised


def test_watchdog_interval_is_read_for_this_process_only() -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_seconds == 30.0
    assert Notifier({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_seconds == 2.0
    assert Notifier({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}).watchdog_seconds is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_seconds is None
    assert Notifier({"WATCHDOG_USEC": "soon"}).watchdog_seconds is None


def test_journal_lines_carry_their_syslog_priority() -> None:
    import logging

    formatter = JournalFormatter("%(name)s: %(message)s")
    record = logging.LogRecord("selftune.api", logging.ERROR, __file__, 1, "boom\nsecond line", None, None)
    assert formatter.format(record) == "<3>selftune.api: boom\n<3>second line"
    record = logging.LogRecord("selftune.api", logging.INFO, __file__, 1, "fine", None, None)
    assert formatter.format(record) == "<6>selftune.api: fine"


def unit_settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_unit_file_is_a_hardened_notify_service() -> None:
    unit = unit_settings()
    assert unit["Type"] == ["notify"] and unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["ExecStart"] == [f"{INSTALLED_PATH} serve"]
    assert unit["WatchdogSec"] and unit["TimeoutStopSec"] and unit["DynamicUser"] == ["yes"]
    assert unit["StateDirectory"] == ["selftune"] and unit["CacheDirectory"] == ["selftune"]
    for hardening in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "RestrictNamespaces", "SystemCallFilter"):
        assert hardening in unit, hardening
    assert not any("@resources" in f and "~" in f for f in unit["SystemCallFilter"]), "training needs nice/affinity"
    # the service's own stop budget must fit inside systemd's
    from selftune.policies.config import ServerConfig

    assert ServerConfig().stop_timeout_seconds < int(unit["TimeoutStopSec"][0].rstrip("s"))


def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    """`systemd-analyze verify` checks that ExecStart exists: the unit names the documented install path
    (/opt/selftune/.venv), so the check runs on a copy pointing at this venv's `selftune` instead."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed: `apt-get install systemd` (Debian/Ubuntu) to run this check",
                    pytrace=False)
    here = str(Path(sys.executable).with_name("selftune"))
    copy = tmp_path / "selftune.service"
    copy.write_text(UNIT.read_text().replace(INSTALLED_PATH, here))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "selftune.service" not in result.stderr, result.stderr
