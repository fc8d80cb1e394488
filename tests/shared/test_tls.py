"""TLS and mTLS through a real monitor server, with certificates generated for each test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from services.gen.roundtable.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.monitor.service import MONITOR_SERVICE_NAME
from services.monitor.settings import MonitorSettings
from services.shared.processes import free_port
from services.shared.server import ServiceHost
from services.shared.settings import load_settings
from services.shared.tls import ClientTls, create_channel, server_credentials
from tests.shared.conftest import monitor_settings

REFUSED_WITHIN_SECONDS = 3.0
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class Pki:
    """PEM files of a CA, a server certificate it signed, a client certificate it signed, and a stranger's."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def write_leaf(cert: trustme.LeafCert, directory: Path, name: str) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key_path.write_bytes(cert.private_key_pem.bytes())
    return cert_path, key_path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem.bytes())
    server = write_leaf(ca.issue_cert("127.0.0.1", "localhost"), tmp_path, "server")
    client = write_leaf(ca.issue_cert("session.roundtable.internal"), tmp_path, "client")
    stranger = write_leaf(trustme.CA().issue_cert("session.roundtable.internal"), tmp_path, "stranger")
    return Pki(tmp_path / "ca.crt", *server, *client, *stranger)


def tls_server(pki: Pki, *, mtls: bool = False, **overrides: Any) -> MonitorSettings:
    client_ca = {"tls_client_ca_file": pki.ca} if mtls else {}
    return monitor_settings(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, **client_ca, **overrides)


def client_settings(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> MonitorSettings:
    """Settings of a caller: trust roots and, optionally, its own certificate."""
    return monitor_settings(tls_ca_file=ca, tls_client_cert_file=cert, tls_client_key_file=key)


async def health_check(
    address: str, settings: MonitorSettings
) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    async with create_channel(address, settings) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=MONITOR_SERVICE_NAME), timeout=REFUSED_WITHIN_SECONDS
        )
        return response.status


async def assert_refused(address: str, settings: MonitorSettings) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await health_check(address, settings)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    # Refused by the handshake, not left to run into the deadline.
    assert time.monotonic() - started < REFUSED_WITHIN_SECONDS


async def test_tls_client_trusting_the_ca_is_served(
    pki: Pki, start_monitor: Callable[..., Awaitable[ServiceHost]]
) -> None:
    host = await start_monitor(tls_server(pki))
    assert await health_check(host.address, client_settings(pki.ca)) == SERVING
    assert await health_check(f"localhost:{host.port}", client_settings(pki.ca)) == SERVING


async def test_server_name_not_in_its_certificate_is_refused(
    pki: Pki, start_monitor: Callable[..., Awaitable[ServiceHost]]
) -> None:
    host = await start_monitor(tls_server(pki))
    options = [("grpc.ssl_target_name_override", "elsewhere.example")]
    async with create_channel(host.address, client_settings(pki.ca), options=options) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_plaintext_client_is_refused_by_a_tls_server(
    pki: Pki, start_monitor: Callable[..., Awaitable[ServiceHost]]
) -> None:
    host = await start_monitor(tls_server(pki))
    await assert_refused(host.address, client_settings(None))


async def test_tls_client_not_trusting_the_servers_ca_is_refused(
    pki: Pki, start_monitor: Callable[..., Awaitable[ServiceHost]]
) -> None:
    host = await start_monitor(tls_server(pki))
    other_ca = pki.ca.with_name("other-ca.crt")
    other_ca.write_bytes(trustme.CA().cert_pem.bytes())
    await assert_refused(host.address, client_settings(other_ca))


async def test_mtls_server_refuses_a_client_without_a_certificate(
    pki: Pki, start_monitor: Callable[..., Awaitable[ServiceHost]]
) -> None:
    host = await start_monitor(tls_server(pki, mtls=True))
    await assert_refused(host.address, client_settings(pki.ca))


async def test_mtls_server_serves_a_client_certificate_signed_by_its_ca(
    pki: Pki, start_monitor: Callable[..., Awaitable[ServiceHost]]
) -> None:
    host = await start_monitor(tls_server(pki, mtls=True))
    caller = client_settings(pki.ca, pki.client_cert, pki.client_key)
    assert await health_check(host.address, caller) == SERVING


async def test_mtls_server_refuses_a_client_certificate_from_another_ca(
    pki: Pki, start_monitor: Callable[..., Awaitable[ServiceHost]]
) -> None:
    host = await start_monitor(tls_server(pki, mtls=True))
    await assert_refused(host.address, client_settings(pki.ca, pki.stranger_cert, pki.stranger_key))


async def test_plaintext_stays_the_default(start_monitor: Callable[..., Awaitable[ServiceHost]]) -> None:
    settings = monitor_settings()
    assert server_credentials(settings) is None
    host = await start_monitor(settings)
    assert await health_check(host.address, settings) == SERVING


async def test_callers_without_service_settings_use_client_tls(
    pki: Pki, start_monitor: Callable[..., Awaitable[ServiceHost]]
) -> None:
    host = await start_monitor(tls_server(pki, mtls=True))
    caller = ClientTls(tls_ca_file=pki.ca, tls_client_cert_file=pki.client_cert, tls_client_key_file=pki.client_key)
    async with create_channel(host.address, caller) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
    assert response.status == SERVING
    with pytest.raises(ValueError, match="tls_client_key_file"):
        ClientTls(tls_ca_file=pki.ca, tls_client_cert_file=pki.client_cert)
    with pytest.raises(ValueError, match="tls_ca_file"):
        ClientTls(tls_client_cert_file=pki.client_cert, tls_client_key_file=pki.client_key)


async def test_reporter_reports_over_mtls(pki: Pki, start_monitor: Callable[..., Awaitable[ServiceHost]]) -> None:
    port = free_port()
    # The monitor reports to itself, so the reporter's channel must pass the monitor's own mTLS check.
    settings = tls_server(
        pki,
        mtls=True,
        port=port,
        instance_id="monitor-mtls",
        monitor_address=f"127.0.0.1:{port}",
        report_interval_seconds=0.1,
        tls_ca_file=pki.ca,
        tls_client_cert_file=pki.client_cert,
        tls_client_key_file=pki.client_key,
    )
    host = await start_monitor(settings)
    async with create_channel(host.address, settings) as channel:
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        deadline = time.monotonic() + 10
        while True:
            stats = await stub.GetConcurrencyStats(monitor_pb2.GetConcurrencyStatsRequest(), timeout=5)
            if [row.instance_id for row in stats.instances] == ["monitor-mtls"]:
                break
            assert time.monotonic() < deadline, "the reporter's reports never arrived"
            await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("files", "named"),
    [
        ({"tls_cert_file": "server.crt", "tls_key_file": "missing.key"}, "tls_key_file"),
        ({"tls_cert_file": "server.crt"}, "tls_key_file"),
        ({"tls_key_file": "server.key"}, "tls_cert_file"),
        ({"tls_cert_file": "server.key", "tls_key_file": "server.key"}, "tls_cert_file"),
        ({"tls_cert_file": "server.crt", "tls_key_file": "server.crt"}, "tls_key_file"),
        ({"tls_client_ca_file": "ca.crt"}, "tls_client_ca_file"),
        ({"tls_ca_file": "ca.crt", "tls_client_cert_file": "client.crt"}, "tls_client_key_file"),
        ({"tls_client_cert_file": "client.crt", "tls_client_key_file": "client.key"}, "tls_ca_file"),
        ({"tls_ca_file": "."}, "tls_ca_file"),
    ],
)
def test_bad_tls_settings_name_the_setting(pki: Pki, files: dict[str, str], named: str) -> None:
    with pytest.raises(ValidationError) as invalid:
        monitor_settings(**{name: pki.ca.parent / file for name, file in files.items()})
    assert named in str(invalid.value)


def test_bad_tls_flags_stop_start_up_naming_the_setting(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        load_settings(MonitorSettings, ["--tls-cert-file", str(pki.server_cert)])
    assert stopped.value.code == 2
    assert "tls_key_file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_settings(MonitorSettings, ["--tls-cert-file", str(pki.server_cert), "--tls-key-file", "nope.key"])
    assert "tls_key_file (--tls-key-file or ROUNDTABLE_MONITOR_TLS_KEY_FILE)" in capsys.readouterr().err


def test_empty_tls_values_mean_plaintext(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUNDTABLE_MONITOR_TLS_CA_FILE", "")
    settings = load_settings(MonitorSettings, ["--tls-cert-file", "", "--tls-key-file", ""])
    assert (settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file) == (None, None, None)
