"""Transport security and caller authentication for the gRPC server.

* TLS / mutual TLS: :func:`server_credentials` turns ``server.tls`` into gRPC server
  credentials. The PEM files are read at start-up and again when they change
  (:class:`CertificateFiles`: a renewed certificate, e.g. from cert-manager, is used for new
  connections without a restart).
* Bearer tokens: :class:`BearerAuth` checks the ``authorization: Bearer <token>``
  metadata of every RouterService call (:class:`server.rpc_gate.RpcGate` asks it) against a
  :class:`TokenTable` (``server.auth.tokens_file`` and env ``GMTROUTER_AUTH_TOKENS``).
  No or an unknown token → UNAUTHENTICATED; a known token without the method's scope →
  PERMISSION_DENIED. Health checks and reflection stay open (probes carry no token): they
  are registered outside the gate. A service registered without the gate is open too: every
  service that needs a token goes through ``RpcGate.register`` (``server/app.py``).

Tokens are kept only as SHA-256 digests and are never logged; a token's *fingerprint* (the
first 8 hex digits of its digest) identifies it in logs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import grpc
import structlog

from server.config import AuthSettings, TLSSettings

log = structlog.get_logger(__name__)

#: Environment variable with comma-separated bearer tokens (all scopes).
TOKENS_ENV = "GMTROUTER_AUTH_TOKENS"

#: Scopes a token may carry. ``route``: Select, RecordResponse, StreamPreferences;
#: ``admin``: DeleteUser. A token listed without scopes has all of them.
SCOPES = frozenset({"route", "admin"})

#: RouterService method → scope it needs (methods not listed need ``admin``).
METHOD_SCOPES: Mapping[str, str] = {
    "Select": "route",
    "RecordResponse": "route",
    "StreamPreferences": "route",
    "DeleteUser": "admin",
}

#: Shortest accepted token (characters): guessable tokens are refused at start-up.
MIN_TOKEN_CHARS = 16


class SecurityConfigError(ValueError):
    """A TLS file or the token list cannot be used; the message names the setting."""


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"{setting}: cannot read {path!r}: {exc.strerror}") from None


class CertificateFiles:
    """The server's TLS files (``server.tls``), re-read when they change.

    grpc calls :meth:`fetch` before every new connection's TLS handshake
    (``grpc.dynamic_ssl_server_credentials``). It looks at the files' modification time,
    size and inode at most every :attr:`check_interval_s` seconds; when any changed, it
    reads them again and hands grpc the new configuration. A Kubernetes Secret volume swaps
    all files at once (a symlink), so a renewed certificate and its key arrive together.
    Connections open at the time keep their certificate. Files that cannot be read, or a
    certificate that does not match its key (one file renewed, the other not yet), are
    logged and the current configuration stays in use; the next change is tried again.

    Args:
        tls: The settings; ``cert_file`` and ``key_file`` must be set.
        check_interval_s: Least time between two looks at the files, in seconds.

    Raises:
        SecurityConfigError: at construction, a PEM file is missing or unreadable, or the
            certificate and key do not form a pair (see :func:`_check_pair`).
    """

    def __init__(self, tls: TLSSettings, check_interval_s: float = 1.0) -> None:
        assert tls.cert_file is not None and tls.key_file is not None
        self._files = {"server.tls.cert_file": tls.cert_file, "server.tls.key_file": tls.key_file}
        if tls.client_ca_file is not None:
            self._files["server.tls.client_ca_file"] = tls.client_ca_file
        self.check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._next_check = 0.0
        self._stamp = self._stamps()
        self._failed: tuple[tuple[int, int, int], ...] | None = None  # logged already
        #: The configuration grpc uses for new connections.
        self.current = self._load()
        #: How many times changed files were loaded since start-up.
        self.reloads = 0

    def _stamps(self) -> tuple[tuple[int, int, int], ...] | None:
        try:
            return tuple(
                (st.st_mtime_ns, st.st_size, st.st_ino)
                for st in (os.stat(path) for path in self._files.values())
            )
        except OSError:
            return None

    def _load(self) -> grpc.ServerCertificateConfiguration:
        pem = {setting: _read(path, setting) for setting, path in self._files.items()}
        _check_pair(pem["server.tls.cert_file"], pem["server.tls.key_file"])
        return grpc.ssl_server_certificate_configuration(
            [(pem["server.tls.key_file"], pem["server.tls.cert_file"])],
            root_certificates=pem.get("server.tls.client_ca_file"),
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration when the files changed since the last load, else None
        (grpc keeps the current one). Called by grpc's threads; thread-safe."""
        now = time.monotonic()
        with self._lock:
            if now < self._next_check:
                return None
            self._next_check = now + self.check_interval_s
            stamp = self._stamps()
            if stamp == self._stamp or (stamp is not None and stamp == self._failed):
                return None
            if stamp is None:
                if self._stamp is not None:
                    log.error(
                        "TLS file missing; keeping the current certificate",
                        files=sorted(self._files.values()),
                    )
                self._stamp = None
                return None
            try:
                config = self._load()
            except SecurityConfigError as exc:
                self._failed = stamp
                log.error("TLS files not reloaded; keeping the current ones", error=str(exc))
                return None
            self._stamp = stamp
            self.current = config
            self.reloads += 1
        log.info("TLS files reloaded", files=sorted(self._files.values()))
        return config


def _check_pair(cert: bytes, key: bytes) -> None:
    """Raise :class:`SecurityConfigError` unless ``key`` is the unencrypted private key of
    the first certificate in ``cert`` (both PEM), checked by OpenSSL through :mod:`ssl` (in
    a private temporary folder, removed afterwards). grpc cannot use an encrypted key either;
    the empty password makes OpenSSL refuse one instead of prompting for a pass phrase."""
    try:
        with tempfile.TemporaryDirectory(prefix="gmtrouter-tls-") as folder:
            cert_path, key_path = Path(folder, "cert.pem"), Path(folder, "key.pem")
            cert_path.write_bytes(cert)
            key_path.touch(mode=0o600)
            key_path.write_bytes(key)
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
                cert_path, key_path, password=b""
            )
    except ssl.SSLError as exc:
        raise SecurityConfigError(
            "server.tls.cert_file and server.tls.key_file do not form a pair (mismatched, an "
            f"encrypted key, or not PEM): {exc.reason or exc}"
        ) from None
    except OSError as exc:
        raise SecurityConfigError(
            f"server.tls: cannot check the certificate against its key: {exc}"
        ) from None


def server_credentials(
    tls: TLSSettings, *, check_interval_s: float = 1.0
) -> grpc.ServerCredentials | None:
    """gRPC server credentials for ``server.tls``, or None when TLS is off.

    The files are re-read when they change (:class:`CertificateFiles`), looked at no more
    than every ``check_interval_s`` seconds.

    Raises:
        SecurityConfigError: a PEM file is missing or unreadable, or the certificate does not
            match its key (or the key is encrypted).
    """
    if tls.cert_file is None or tls.key_file is None:
        return None
    files = CertificateFiles(tls, check_interval_s)
    # grpc takes None from the fetcher as "no change"; types-grpcio's stub omits the None.
    fetch = cast("Callable[[], grpc.ServerCertificateConfiguration]", files.fetch)
    return grpc.dynamic_ssl_server_credentials(
        files.current, fetch, require_client_authentication=tls.require_client_auth
    )


def fingerprint(token: str) -> str:
    """First 8 hex digits of the token's SHA-256: safe to log."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


@dataclasses.dataclass(frozen=True)
class TokenTable:
    """Accepted bearer tokens (as SHA-256 digests) and their scopes."""

    entries: tuple[tuple[bytes, frozenset[str]], ...] = ()

    @property
    def enabled(self) -> bool:
        """True when at least one token is configured (authentication is on)."""
        return bool(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def scopes(self, token: str) -> frozenset[str] | None:
        """The token's scopes, or None for an unknown token (constant time per entry)."""
        digest = hashlib.sha256(token.encode()).digest()
        found: frozenset[str] | None = None
        for known, scopes in self.entries:
            if hmac.compare_digest(known, digest):
                found = scopes
        return found

    @classmethod
    def from_tokens(cls, tokens: Mapping[str, frozenset[str]]) -> TokenTable:
        """Build from token → scopes.

        Raises:
            SecurityConfigError: a token is shorter than :data:`MIN_TOKEN_CHARS` or a scope
                is unknown.
        """
        entries = []
        for token, scopes in tokens.items():
            if len(token) < MIN_TOKEN_CHARS:
                raise SecurityConfigError(
                    f"bearer token {fingerprint(token)} has {len(token)} characters; "
                    f"at least {MIN_TOKEN_CHARS} are required"
                )
            unknown = sorted(scopes - SCOPES)
            if unknown:
                raise SecurityConfigError(
                    f"bearer token {fingerprint(token)}: unknown scope(s) {unknown}; "
                    f"allowed: {sorted(SCOPES)}"
                )
            entries.append((hashlib.sha256(token.encode()).digest(), scopes or SCOPES))
        return cls(tuple(entries))


def _parse_tokens_file(text: str, source: str) -> dict[str, frozenset[str]]:
    out: dict[str, frozenset[str]] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) > 2:
            raise SecurityConfigError(
                f"{source}:{n}: expected 'TOKEN' or 'TOKEN scope[,scope]', got {len(parts)} fields"
            )
        scopes = frozenset(s for s in parts[1].split(",") if s) if len(parts) == 2 else SCOPES
        out[parts[0]] = scopes
    return out


def load_tokens(auth: AuthSettings, environ: Mapping[str, str]) -> TokenTable:
    """Tokens from ``auth.tokens_file`` and ``GMTROUTER_AUTH_TOKENS``; empty = auth off.

    Raises:
        SecurityConfigError: the file is unreadable or holds no token, a line is malformed,
            a token is too short or names an unknown scope.
    """
    tokens: dict[str, frozenset[str]] = {}
    if auth.tokens_file is not None:
        text = _read(auth.tokens_file, "server.auth.tokens_file").decode("utf-8", "replace")
        tokens.update(_parse_tokens_file(text, auth.tokens_file))
        if not tokens:
            raise SecurityConfigError(
                f"server.auth.tokens_file: {auth.tokens_file!r} holds no token "
                "(refusing to start without authentication while a tokens file is configured)"
            )
    for token in environ.get(TOKENS_ENV, "").split(","):
        if token.strip():
            tokens[token.strip()] = SCOPES
    return TokenTable.from_tokens(tokens)


def bearer_token(metadata: Any) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, or None."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class BearerAuth:
    """Require a known bearer token (with the method's scope) on every RouterService call;
    :class:`server.rpc_gate.RpcGate` asks it before each call.

    Args:
        tokens: The accepted tokens.
    """

    def __init__(self, tokens: TokenTable) -> None:
        self.tokens = tokens

    def check(self, method: str, metadata: Any) -> tuple[grpc.StatusCode, str] | None:
        """None when the call's ``authorization: Bearer <token>`` metadata carries a known
        token with the scope ``method`` (a RouterService method name, e.g. ``"Select"``)
        needs; else the status code and message to abort the call with: UNAUTHENTICATED (no
        or an unknown token) or PERMISSION_DENIED (the token lacks the scope)."""
        token = bearer_token(metadata)
        if token is None:
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "missing bearer token: send metadata 'authorization: Bearer <token>'",
            )
        scopes = self.tokens.scopes(token)
        if scopes is None:
            log.warning("rejected token", method=method, token=fingerprint(token))
            return grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token"
        need = METHOD_SCOPES.get(method, "admin")
        if need not in scopes:
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"token {fingerprint(token)} lacks scope {need!r} needed by {method}",
            )
        return None
