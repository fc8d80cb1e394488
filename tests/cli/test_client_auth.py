"""The CLI as a client of a locked-down server: API key and TLS from flags or ROUNDTABLE_* variables."""

from __future__ import annotations

import asyncio
import os
import pathlib
import sys
from collections.abc import Awaitable, Callable

import trustme

from services.session.keys import add_key
from tests.suite import Suite

MakeSuite = Callable[..., Awaitable[Suite]]
REPO = pathlib.Path(__file__).resolve().parents[2]


async def roundtable(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_cli_sends_the_api_key_over_tls(make_suite: MakeSuite, tmp_path: pathlib.Path) -> None:
    keys = tmp_path / "keys.toml"
    key = add_key(keys, "alice")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    cert, private_key, ca_file = tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem"
    server_cert.cert_chain_pems[0].write_to_path(str(cert))
    server_cert.private_key_pem.write_to_path(str(private_key))
    ca.cert_pem.write_to_path(str(ca_file))
    suite = await make_suite(
        session={
            "api_keys_file": keys,
            "allow_anonymous": False,
            "tls_cert_file": cert,
            "tls_key_file": private_key,
        }
    )
    address = suite.session_host.address
    code, out, err = await roundtable("--address", address, "--tls-ca-file", str(ca_file), "--api-key", key, "discuss",
                                      "Is TLS worth it?", "--personas", "engineer")  # fmt: skip
    assert code == 0, err
    assert "● status: COMPLETED" in out
    code, out, _ = await roundtable(
        "--address", address, "list", env={"ROUNDTABLE_API_KEY": key, "ROUNDTABLE_TLS_CA_FILE": str(ca_file)}
    )
    assert code == 0 and "Is TLS worth it?" in out
    code, _, err = await roundtable("--address", address, "--tls-ca-file", str(ca_file), "list")
    assert code == 2 and "UNAUTHENTICATED" in err and "API key" in err
    code, _, err = await roundtable("--address", address, "--api-key", key, "list")  # plaintext to a TLS server
    assert code == 2 and "UNAVAILABLE" in err
