"""TLS, mutual TLS and bearer-token authentication of the gRPC server (in process)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gmtrouter.v1 import router_pb2 as pb
from gmtrouter.v1 import router_pb2_grpc
from server.config import ConfigError, parse_settings
from server.security import (
    TOKENS_ENV,
    SecurityConfigError,
    TokenTable,
    bearer_token,
    fingerprint,
    load_tokens,
)
from tests.server.inprocess import make_certificates, running, select_request

TOKEN = "route-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def _creds(certs: dict[str, Path], client: str | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=certs["ca"].read_bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=certs["ca"].read_bytes(),
        private_key=certs[f"{client}_key"].read_bytes(),
        certificate_chain=certs[client].read_bytes(),
    )


async def _select(channel: grpc.aio.Channel, metadata: tuple = ()) -> pb.SelectResponse:
    stub = router_pb2_grpc.RouterServiceStub(channel)
    return await stub.Select(select_request(), timeout=10, metadata=metadata)


# -- TLS ---------------------------------------------------------------------------------------


async def test_tls_client_succeeds_plaintext_fails(certs: dict[str, Path]) -> None:
    tls = {"cert_file": str(certs["server"]), "key_file": str(certs["server_key"])}
    async with running({"tls": tls}) as app:
        async with grpc.aio.secure_channel(f"localhost:{app.port}", _creds(certs)) as ch:
            assert (await _select(ch)).selected_model in {"a", "b"}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _select(ch)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_client_certificate(certs: dict[str, Path]) -> None:
    tls = {
        "cert_file": str(certs["server"]),
        "key_file": str(certs["server_key"]),
        "client_ca_file": str(certs["ca"]),
        "require_client_auth": True,
    }
    async with running({"tls": tls}) as app:
        target = f"localhost:{app.port}"
        async with grpc.aio.secure_channel(target, _creds(certs, "client")) as ch:
            assert (await _select(ch)).selected_model in {"a", "b"}
        for creds in (_creds(certs), _creds(certs, "rogue")):  # no cert; cert of another CA
            async with grpc.aio.secure_channel(target, creds) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _select(ch)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_renewed_certificate_is_used_without_a_restart(tmp_path: Path) -> None:
    """cert-manager renews the Secret; the mounted files change. New connections get the new
    certificate (checked by a client that trusts only the new CA), without a restart."""
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old, new = make_certificates(tmp_path / "old"), make_certificates(tmp_path / "new")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "tls.crt", live / "tls.key"
    cert.write_bytes(old["server"].read_bytes())
    key.write_bytes(old["server_key"].read_bytes())
    async with running({"tls": {"cert_file": str(cert), "key_file": str(key)}}) as app:
        target = f"localhost:{app.port}"
        async with grpc.aio.secure_channel(target, _creds(old)) as ch:
            assert (await _select(ch)).selected_model in {"a", "b"}
        # A half-done renewal: the new certificate with the old key is not a pair; the old
        # certificate stays in use (grpc would otherwise fail every new handshake).
        cert.write_bytes(new["server"].read_bytes())
        await asyncio.sleep(1.2)  # the files are looked at no more than once a second
        async with grpc.aio.secure_channel(target, _creds(old)) as ch:
            assert (await _select(ch)).selected_model in {"a", "b"}
        # Renewed the way a Secret volume swaps files: both at once (here: one rename each).
        for name, src in ((cert, new["server"]), (key, new["server_key"])):
            name.with_suffix(".tmp").write_bytes(src.read_bytes())
            name.with_suffix(".tmp").replace(name)
        await asyncio.sleep(1.2)
        async with grpc.aio.secure_channel(target, _creds(new)) as ch:
            assert (await _select(ch)).selected_model in {"a", "b"}
        async with grpc.aio.secure_channel(target, _creds(old)) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _select(ch)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # A file that disappears (a broken renewal) keeps the last good certificate in use.
        key.unlink()
        await asyncio.sleep(1.2)
        async with grpc.aio.secure_channel(target, _creds(new)) as ch:
            assert (await _select(ch)).selected_model in {"a", "b"}


def test_tls_settings_validation() -> None:
    with pytest.raises(ConfigError, match="cert_file and key_file must be set together"):
        parse_settings({"server": {"tls": {"cert_file": "x.pem"}}})
    with pytest.raises(ConfigError, match="require_client_auth needs client_ca_file"):
        parse_settings(
            {"server": {"tls": {"cert_file": "a", "key_file": "b", "require_client_auth": True}}}
        )


async def test_a_certificate_that_does_not_match_its_key_fails_start(
    certs: dict[str, Path],
) -> None:
    tls = {"cert_file": str(certs["server"]), "key_file": str(certs["client_key"])}
    with pytest.raises(SecurityConfigError, match="do not form a pair"):
        async with running({"tls": tls}):
            pass


@pytest.fixture
def encrypted_key(certs: dict[str, Path], tmp_path: Path) -> Path:
    """The server key, encrypted with a pass phrase."""
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(certs["server_key"]), "-aes256", "-passout", "pass:secret",
         "-out", str(encrypted)],
        check=True, capture_output=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return encrypted


async def test_an_encrypted_key_fails_start_without_a_prompt(
    certs: dict[str, Path], encrypted_key: Path
) -> None:
    """grpc cannot use an encrypted key: it is refused with the setting named, and OpenSSL
    never waits for a pass phrase on a terminal."""
    tls = {"cert_file": str(certs["server"]), "key_file": str(encrypted_key)}
    with pytest.raises(SecurityConfigError, match="encrypted key"):
        async with running({"tls": tls}):
            pass


async def test_missing_certificate_file_fails_start(tmp_path: Path) -> None:
    tls = {"cert_file": str(tmp_path / "nope.pem"), "key_file": str(tmp_path / "nope.key")}
    with pytest.raises(SecurityConfigError, match=r"server\.tls\.cert_file: cannot read"):
        async with running({"tls": tls}):
            pass


# -- bearer tokens -----------------------------------------------------------------------------


async def test_bearer_tokens(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# clients\n{TOKEN} route\n{ADMIN} route,admin\n")
    async with (
        running({"auth": {"tokens_file": str(tokens)}}) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch,
    ):
        stub = router_pb2_grpc.RouterServiceStub(ch)
        ok = await _select(ch, (("authorization", f"Bearer {TOKEN}"),))
        assert ok.selected_model in {"a", "b"}
        for md in ((), (("authorization", "Bearer wrong-token-0123456789"),)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _select(ch, md)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert TOKEN not in str(err.value.details())
        # streams are guarded too
        call = stub.StreamPreferences(
            pb.StreamPreferencesRequest(
                user_ids=["u1"], candidate_models=[pb.CandidateModel(model="a")]
            ),
            timeout=10,
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # scopes: DeleteUser needs "admin"
        req = pb.DeleteUserRequest(user_id="u1")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.DeleteUser(req, metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert fingerprint(TOKEN) in str(err.value.details())
        deleted = await stub.DeleteUser(req, metadata=(("authorization", f"Bearer {ADMIN}"),))
        assert deleted.deleted_interactions == 0
        # health stays open (Kubernetes probes carry no token)
        health = health_pb2_grpc.HealthStub(ch)
        resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_tokens_from_environment() -> None:
    async with (
        running(environ={TOKENS_ENV: f" {TOKEN} ,{ADMIN}"}) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch,
    ):
        md = (("authorization", f"bearer {ADMIN}"),)
        await router_pb2_grpc.RouterServiceStub(ch).DeleteUser(
            pb.DeleteUserRequest(user_id="x"), metadata=md, timeout=10
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _select(ch)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_no_tokens_means_open() -> None:
    async with running() as app, grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        assert (await _select(ch)).selected_model in {"a", "b"}


def test_token_loading_errors(tmp_path: Path) -> None:
    from server.config import AuthSettings

    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(SecurityConfigError, match="holds no token"):
        load_tokens(AuthSettings(tokens_file=str(empty)), {})
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(SecurityConfigError, match="at least 16") as err:
        load_tokens(AuthSettings(tokens_file=str(short)), {})
    assert "abc" not in str(err.value).replace(fingerprint("abc"), "")
    bad_scope = tmp_path / "scope"
    bad_scope.write_text(f"{TOKEN} root\n")
    with pytest.raises(SecurityConfigError, match="unknown scope"):
        load_tokens(AuthSettings(tokens_file=str(bad_scope)), {})
    with pytest.raises(SecurityConfigError, match="cannot read"):
        load_tokens(AuthSettings(tokens_file=str(tmp_path / "missing")), {})
    assert not load_tokens(AuthSettings(), {}).enabled


def test_token_table_and_header_parsing() -> None:
    table = TokenTable.from_tokens({TOKEN: frozenset({"route"})})
    assert table.scopes(TOKEN) == frozenset({"route"})
    assert table.scopes(TOKEN + "x") is None
    assert TOKEN.encode() not in repr(table).encode()
    assert bearer_token((("authorization", f"Bearer  {TOKEN} "),)) == TOKEN
    assert bearer_token((("authorization", f"Basic {TOKEN}"),)) is None
    assert bearer_token(()) is None
