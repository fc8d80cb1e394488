"""Transport security from the settings: TLS or mTLS server credentials, and channels to other services
that carry the service credential when one is set."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from services.shared.service_auth import token_interceptors
from services.shared.settings import ServiceSettings


class ClientTlsSettings(Protocol):
    """What an outgoing channel needs to know; every service's settings have it."""

    @property
    def tls_ca_file(self) -> pathlib.Path | None:
        """Trust roots for the server called; None means plaintext."""

    @property
    def tls_client_cert_file(self) -> pathlib.Path | None:
        """Our certificate chain for mTLS, or None."""

    @property
    def tls_client_key_file(self) -> pathlib.Path | None:
        """The private key of tls_client_cert_file, or None."""

    @property
    def internal_token_value(self) -> str:
        """The service credential sent on every call, or "" for none."""


@dataclass(frozen=True)
class ClientTls:
    """Outgoing TLS for callers without service settings, such as the CLI."""

    tls_ca_file: pathlib.Path | None = None
    tls_client_cert_file: pathlib.Path | None = None
    tls_client_key_file: pathlib.Path | None = None
    # Only the internal services (the monitor, for its tools) want it; the session service does not.
    internal_token_value: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if (self.tls_client_cert_file is None) != (self.tls_client_key_file is None):
            raise ValueError("tls_client_cert_file and tls_client_key_file go together")
        if self.tls_client_cert_file is not None and self.tls_ca_file is None:
            raise ValueError("tls_client_cert_file needs tls_ca_file: a client certificate is only sent over TLS")


def _read(path: pathlib.Path | None) -> bytes | None:
    return None if path is None else path.read_bytes()


def server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """TLS server credentials (requiring client certificates when tls_client_ca_file is set), or None for plaintext."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    key, cert = settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes()
    client_ca = _read(settings.tls_client_ca_file)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_credentials(settings: ClientTlsSettings) -> grpc.ChannelCredentials | None:
    """TLS channel credentials (with our client certificate when one is set), or None for plaintext."""
    if settings.tls_ca_file is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=settings.tls_ca_file.read_bytes(),
        private_key=_read(settings.tls_client_key_file),
        certificate_chain=_read(settings.tls_client_cert_file),
    )


def create_channel(
    address: str,
    settings: ClientTlsSettings,
    *,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
) -> grpc.aio.Channel:
    """A channel to another service: TLS when tls_ca_file is set, else plaintext; files are read once, here.

    With a service credential set, every call on the channel carries it (the agents and monitor require it).
    """
    credentials = channel_credentials(settings)
    if settings.internal_token_value:
        interceptors = [*token_interceptors(settings.internal_token_value), *(interceptors or ())]
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
