"""Files on disk are the owner's alone, and the CA key is out of every service's reach.

The attack: another local user reads what ``cuga up`` leaves under its data directory
(databases, audit files, tokens, keys), or a compromised service reads the CA key beside
its own and mints certificates for any identity. The services run the way ``cuga up``
runs them, under a permissive umask (022, the usual default), through a real
orchestration; then every directory must be 0700 and every file 0600, and no path a
service is configured with may lie in (or contain) the directory of the CA's key.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cuga.cli.runs import parse_plan
from cuga.cli.tls import ENV_CA, ensure_local_tls, issue, make_ca, write_pair
from cuga.cli.up import cluster
from cuga.client import CoordinatorClient
from cuga.common.v1 import common_pb2
from cuga.coordinator.v1 import coordinator_pb2
from cuga.shared.config import SERVICE_NAMES, load_settings
from cuga.shared.sqlite import open_sqlite
from tests.support.ports import free_ports

PLAN = [
    {"id": "add", "tool": "calculator", "input": {"expression": "2 * 21"}},
    {
        "id": "say",
        "tool": "echo",
        "depends_on": ["add"],
        "input": {"n": "{{steps.add.output.result}}"},
    },
]


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """Umask 022 for this process and the services it starts (they inherit it)."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUGA_", "OTEL_"))}
    env["CUGA_DATA_DIR"] = str(data_dir)
    env["CUGA_LOG_LEVEL"] = "WARNING"
    for name, port in zip(SERVICE_NAMES, free_ports(len(SERVICE_NAMES)), strict=True):
        env[f"CUGA_ADDRESSES__{name.upper()}"] = f"127.0.0.1:{port}"
    return env


def _loose(root: Path) -> list[str]:
    """Every path under ``root`` (itself included) that is not 0700 (dir) / 0600 (file)."""
    found = []
    for path in (root, *sorted(root.rglob("*"))):
        st = path.lstat()
        want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
        if stat.S_IMODE(st.st_mode) != want:
            found.append(f"{path.relative_to(root.parent)} is {stat.S_IMODE(st.st_mode):04o}")
    return found


def _environ(pid: int) -> dict[str, str]:
    """The environment a running process actually holds."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode() for k, v in pairs}


def _ca_keys(root: Path, ca_file: Path) -> list[Path]:
    """Every file under ``root`` holding the private key of the CA certificate ``ca_file``."""
    ca_public = x509.load_pem_x509_certificate(ca_file.read_bytes()).public_key()
    keys = []
    for path in root.rglob("*"):
        if not path.is_file() or b"PRIVATE KEY" not in path.read_bytes():
            continue
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        if key.public_key() == ca_public:
            keys.append(path)
    return keys


def _touches(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are the same path or one lies inside the other."""
    return a == b or a in b.parents or b in a.parents


def _assert_ca_key_apart(data_dir: Path, ca_file: Path, pids: dict[str, int]) -> None:
    """No service holds a path (other than the data directory itself) that is the CA key's
    directory, lies inside it or contains it; the CA file it trusts holds no key."""
    keys = _ca_keys(data_dir, ca_file)
    assert keys, "the CA key should be under the data directory"
    for name, pid in pids.items():
        environ = _environ(pid)
        assert b"PRIVATE KEY" not in Path(environ[ENV_CA]).read_bytes(), name
        for var, value in environ.items():
            if not var.startswith("CUGA_") or var == "CUGA_DATA_DIR" or "/" not in value:
                continue
            for key in keys:
                assert not _touches(key.parent, Path(value)), (
                    f"{name}'s {var}={value} reaches the CA key's directory {key.parent}"
                )


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc/<pid>/environ")
@pytest.mark.parametrize("tls", [False, True], ids=["plaintext-jsonl-audit", "mutual-tls"])
async def test_cuga_up_leaves_nothing_readable_by_others(
    tmp_path: Path, tls: bool, permissive_umask: None
) -> None:
    data_dir = tmp_path / "data"
    env = _env(data_dir)
    if not tls:
        env["CUGA_AUDIT__BACKEND"] = "jsonl"  # the other file-backed audit store
    async with cluster(load_settings(env=env), env, tls=tls) as c:
        tls_config = c.settings.common.tls
        async with CoordinatorClient(
            c.settings.common.addresses.coordinator,
            metadata=c.metadata("client"),
            credentials=tls_config.channel_credentials(),
            channel_options=tls_config.channel_options(),
        ) as client:
            steps, _ = parse_plan(PLAN, "plan")
            request = coordinator_pb2.OrchestrateRequest(goal="add and say", steps=steps)
            stages = [r.event.stage async for r in client.orchestrate(request, timeout=30)]
        assert stages[-1] == common_pb2.LIFECYCLE_STAGE_COMPLETE
        # While everything runs: SQLite's -wal/-shm side files exist now.
        assert list(data_dir.glob("*.db-wal")), "expected live SQLite WAL files"
        loose = _loose(data_dir)
        assert not loose, "readable by others while running:\n" + "\n".join(loose)
        if tls:
            assert c.tls is not None
            _assert_ca_key_apart(data_dir, c.tls.ca_file, {n: p.pid for n, p in c.procs.items()})
        assert c.died() is None
    # The run's audit records reached the file-backed store before the services stopped.
    assert list(data_dir.glob("audit/*.jsonl") if not tls else data_dir.glob("audit.db"))
    loose = _loose(data_dir)
    assert not loose, "readable by others after stopping:\n" + "\n".join(loose)


def test_an_existing_install_is_tightened_and_its_ca_key_moved_apart(
    tmp_path: Path, permissive_umask: None, caplog: pytest.LogCaptureFixture
) -> None:
    """What an older version left (0755 directories, 0644 files, the CA key beside the
    service keys) is made owner-only, with a warning naming each path, at the next start."""
    data_dir = tmp_path / "data"
    tls_dir = data_dir / "tls"
    tls_dir.mkdir(parents=True, mode=0o755)
    os.chmod(data_dir, 0o755)
    os.chmod(tls_dir, 0o755)
    ca = make_ca()
    write_pair(tls_dir, "ca", ca)
    for name in (*SERVICE_NAMES, "client"):
        write_pair(tls_dir, name, issue(ca, name, hosts=("localhost",)))
    for path in tls_dir.iterdir():
        path.chmod(0o644)
    db = data_dir / "approval.db"
    old = sqlite3.connect(db)
    old.execute("PRAGMA journal_mode=WAL")
    old.execute("CREATE TABLE t (x)")
    old.commit()  # the connection stays open: -wal and -shm stay on disk
    for path in data_dir.glob("approval.db*"):
        path.chmod(0o644)
    assert _loose(data_dir)

    with caplog.at_level(logging.WARNING, logger="cuga.files"):
        local = ensure_local_tls(tls_dir)
        open_sqlite(db).close()
    old.close()

    assert local.written == ()  # the same CA and certificates, kept
    assert not (tls_dir / "ca.key").exists()
    assert _ca_keys(data_dir, local.ca_file) == [local.ca_key_file]
    assert local.ca_key_file.parent != tls_dir
    loose = _loose(data_dir)
    assert not loose, "still readable by others:\n" + "\n".join(loose)
    warned = caplog.text
    for path in (data_dir, tls_dir, db, tls_dir / "routing.key"):
        assert str(path) in warned
