"""TLS: the contexts cached uses, built once from the configuration.

- :func:`client_tls` — what verifies the upstream (``upstream_ca_file``, or the system store;
  ``upstream_insecure`` turns verification off, with a warning at every start). Built once
  in the app's start-up, read-only after that; every ``ClientSession`` that talks to the
  upstream (or to peers) gets it. Keystone is reached through keystoneauth1, which takes
  the bundle's path (``keystone_authtoken.cafile``, ``cached/identity/keystone.py``) rather
  than a context: here that bundle is only checked, so a bad one fails the start (and
  ``check-config``) instead of the first token request.
- :class:`ServerTLS` — the listeners' certificate and key (``tls_cert_file``/``tls_key_file``)
  and, for the management listener, the CA its clients' certificates must chain to
  (``admin_tls_client_ca``). :meth:`ServerTLS.reload` loads the files again into the same
  contexts: new handshakes present the new certificate, connections already established keep
  theirs (a running download is not cut). Only the event loop's reload handler calls it, in a
  worker thread; files that do not load leave the running certificate in place.

Everything here reads files: call it from a thread, never on the event loop.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass

from cached.config import Config
from cached.errors import ConfigError

log = logging.getLogger("cached.tls")


def client_context(ca_file: str, option: str) -> ssl.SSLContext:
    """A verifying client context: ``ca_file`` if given, else the system's trust store.

    Raises:
        ConfigError: naming ``option`` when the bundle cannot be read or parsed.
    """
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"option {option!r}: cannot load {ca_file}: {_reason(exc)}") from None


def _insecure_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass(frozen=True)
class ClientTLS:
    """The client context for the upstream (and peers)."""

    upstream: ssl.SSLContext


def client_tls(config: Config) -> ClientTLS:
    """Build the client context from ``config``, and check Keystone's CA bundle; logs the
    ``upstream_insecure`` warning.

    Raises:
        ConfigError: a CA bundle cannot be read or parsed (naming its option).
    """
    if config.upstream_insecure:
        log.warning(
            "upstream_insecure: the upstream's TLS certificate is NOT verified; anyone on the "
            "path to %s can read and change images and tokens",
            config.upstream,
        )
        upstream = _insecure_context()
    else:
        upstream = client_context(config.upstream_ca_file, "upstream_ca_file")
    if config.keystone_ca_file:  # loaded by keystoneauth1 from its path: checked only
        client_context(config.keystone_ca_file, "keystone_authtoken.cafile")
    return ClientTLS(upstream)


class ServerTLS:
    """The listeners' TLS contexts, reloadable in place.

    Args:
        cert_file: PEM certificate chain.
        key_file: PEM private key.
        client_ca: if set, a CA bundle; :attr:`management` then requires a client
            certificate chaining to it.
    """

    def __init__(self, cert_file: str, key_file: str, client_ca: str = "") -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.client_ca = client_ca
        self.public = self._server_context()
        self.management = self._server_context()
        if client_ca:
            try:
                self.management.load_verify_locations(cafile=client_ca)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"option 'admin_tls_client_ca': cannot load {client_ca}: {_reason(exc)}"
                ) from None
            self.management.verify_mode = ssl.CERT_REQUIRED
        self.reload()

    @staticmethod
    def _server_context() -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def reload(self) -> None:
        """Load the certificate and key again (call from a thread).

        They are first loaded into a scratch context, so a bad pair raises here and leaves
        the contexts serving the previous certificate.

        Raises:
            ConfigError: naming the option, when the files do not load or do not match.
        """
        try:
            self._server_context().load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"option 'tls_cert_file'/'tls_key_file': cannot load {self.cert_file} with "
                f"{self.key_file}: {_reason(exc)}"
            ) from None
        for context in (self.public, self.management):
            context.load_cert_chain(self.cert_file, self.key_file)


def server_tls(config: Config) -> ServerTLS | None:
    """The listeners' TLS from ``config``; None when no certificate is configured."""
    if not config.tls_cert_file:
        return None
    return ServerTLS(config.tls_cert_file, config.tls_key_file, config.admin_tls_client_ca)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


__all__ = ["ClientTLS", "ServerTLS", "client_context", "client_tls", "server_tls"]
