"""Who gets in, end to end on a real daemon: API keys, TLS and mutual TLS let only the right
clients through while health and reflection stay open, and a full queue refuses work with
RESOURCE_EXHAUSTED instead of dropping it."""

from __future__ import annotations

import random
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server.proto.beastserve.v1 import generate_pb2 as pb
from server.proto.beastserve.v1 import generate_pb2_grpc
from tests.daemon import Daemon

KEYS = ("key-one", "key-two")
PROMPT_IDS = [1, 2, 3, 4, 5, 6, 7, 8]
TIMEOUT = 30  # client-side guard on every call: a hang fails as DEADLINE_EXCEEDED
SMALL_KV_CACHE = ("--kv-cache-bytes", str(8 << 20))  # 16k tokens is plenty; zeroing the default 1 GiB takes seconds


def token_request(max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT_IDS), sampling=pb.SamplingParams(temperature=0),
                              stopping=pb.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True))


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def call_code(fn, *args, **kwargs) -> grpc.StatusCode:
    """The status a call ends with (OK when it returns), draining streams."""
    try:
        result = fn(*args, timeout=TIMEOUT, **kwargs)
        if not isinstance(result, Message):
            list(result)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def serve(daemon: Daemon):
    """Yield the daemon once ready; afterwards, SIGTERM must stop it cleanly."""
    try:
        daemon.wait_ready()
    except Exception:
        daemon.close()
        raise
    yield daemon
    code = daemon.close()
    assert code == 0, f"daemon exited with {code}:\n{daemon.log_path.read_text()}"


# --- API keys and queue limits: one daemon -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_daemon(tiny_model_dir, tmp_path_factory):
    """Two accepted keys; one running sequence and one waiting request at most."""
    path, _ = tiny_model_dir
    tmp = tmp_path_factory.mktemp("api-keys")
    key_file = tmp / "keys.txt"
    key_file.write_text(f"# one key per line\n{KEYS[0]}\n\n{KEYS[1]}\n")
    daemon = Daemon(path, "--api-key-file", str(key_file), "--max-num-seqs", "1", "--max-queue-size", "1",
                    *SMALL_KV_CACHE, log_path=tmp / "daemon.log")
    yield from serve(daemon)


@pytest.fixture(scope="module")
def keyed_stub(keyed_daemon):
    with keyed_daemon.channel() as channel:
        yield generate_pb2_grpc.GenerationStub(channel)


@pytest.mark.parametrize("key", KEYS)
def test_either_api_key_is_accepted(keyed_stub, key):
    unary = keyed_stub.Generate(token_request(4), metadata=bearer(key), timeout=TIMEOUT)
    assert len(unary.token_ids) == 4 and unary.finish_reason == pb.FINISH_REASON_LENGTH
    chunks = list(keyed_stub.GenerateStream(token_request(4), metadata=bearer(key), timeout=TIMEOUT))
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert keyed_stub.GetLoad(pb.GetLoadRequest(), metadata=bearer(key), timeout=TIMEOUT).max_queue_size == 1


BAD_CREDENTIALS = {
    "missing": [],
    "wrong": bearer("key-three"),
    "prefix of a key": bearer(KEYS[0][:-1]),
    "key without Bearer": [("authorization", KEYS[0])],
    "empty bearer": [("authorization", "Bearer ")],
}


@pytest.mark.parametrize("metadata", BAD_CREDENTIALS.values(), ids=BAD_CREDENTIALS.keys())
def test_missing_or_wrong_api_key_is_unauthenticated(keyed_stub, metadata):
    for method, request in [(keyed_stub.Generate, token_request(4)), (keyed_stub.GenerateStream, token_request(4)),
                            (keyed_stub.GetModelInfo, pb.GetModelInfoRequest()),
                            (keyed_stub.GetLoad, pb.GetLoadRequest())]:
        assert call_code(method, request, metadata=metadata) == grpc.StatusCode.UNAUTHENTICATED, method


def test_health_probes_need_no_key(keyed_daemon):
    assert keyed_daemon.health("") == "SERVING"
    assert keyed_daemon.health() == "SERVING"


def test_reflection_needs_no_key(keyed_daemon):
    with keyed_daemon.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=TIMEOUT)
        names = {s.name for s in next(replies).list_services_response.service}
    assert "beastserve.v1.Generation" in names


def test_full_queue_refuses_with_resource_exhausted_and_drops_nothing(keyed_stub):
    num_requests, max_tokens = 6, 300
    barrier = threading.Barrier(num_requests)

    def run(_):
        barrier.wait(timeout=TIMEOUT)  # arrive together, so the queue is full for some
        try:
            return list(keyed_stub.GenerateStream(token_request(max_tokens), metadata=bearer(KEYS[0]),
                                                  timeout=TIMEOUT))
        except grpc.RpcError as err:
            return err

    with ThreadPoolExecutor(num_requests) as pool:
        results = list(pool.map(run, range(num_requests)))
    refused = [r for r in results if isinstance(r, grpc.RpcError)]
    served = [r for r in results if not isinstance(r, grpc.RpcError)]
    assert refused, "one running and one waiting at most, yet no request was refused"
    for err in refused:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert "max_queue_size" in err.details()
    assert served, "every request was refused"
    for chunks in served:
        assert len([t for c in chunks for t in c.token_ids]) == max_tokens
        assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert chunks[-1].usage.completion_tokens == max_tokens
    deadline = time.monotonic() + 10
    while (load := keyed_stub.GetLoad(pb.GetLoadRequest(), metadata=bearer(KEYS[1]), timeout=TIMEOUT)) \
            .kv_blocks_free != load.kv_blocks_total:
        assert time.monotonic() < deadline, f"KV blocks not returned: {load}"
        time.sleep(0.05)


# --- TLS and mutual TLS ------------------------------------------------------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
            "-subj", f"/CN={name}", "-keyout", key.name, "-out", cert.name,
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=directory)
    return cert, key


def issue(directory: Path, name: str, ca: tuple[Path, Path], usage: str) -> tuple[Path, Path]:
    """A leaf certificate for `name` signed by `ca`; usage is serverAuth or clientAuth."""
    cert, key, csr, ext = (directory / f"{name}{suffix}" for suffix in (".pem", ".key", ".csr", ".ext"))
    ext.write_text(f"subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n"
                   "basicConstraints=CA:FALSE\n")
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-subj", f"/CN={name}", "-keyout", key.name, "-out", csr.name, cwd=directory)
    openssl("x509", "-req", "-in", csr.name, "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-days", "2",
            "-set_serial", str(random.getrandbits(63)), "-extfile", ext.name, "-out", cert.name, cwd=directory)
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, other_ca = (make_ca(directory, n) for n in ("server-ca", "client-ca", "other-ca"))
    return dict(server_ca=server_ca, client_ca=client_ca, other_ca=other_ca,
                server=issue(directory, "server", server_ca, "serverAuth"),
                client=issue(directory, "client", client_ca, "clientAuth"),
                rogue_client=issue(directory, "rogue-client", other_ca, "clientAuth"))


def credentials(trusted_ca: tuple[Path, Path], client: tuple[Path, Path] | None = None) -> grpc.ChannelCredentials:
    cert_chain, key = (client[0].read_bytes(), client[1].read_bytes()) if client else (None, None)
    return grpc.ssl_channel_credentials(root_certificates=trusted_ca[0].read_bytes(), private_key=key,
                                        certificate_chain=cert_chain)


def model_info_code(address: str, creds: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    channel = grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)
    with channel:
        return call_code(generate_pb2_grpc.GenerationStub(channel).GetModelInfo, pb.GetModelInfoRequest())


def tls_daemon(model, pki, tmp_path_factory, *flags: str, creds: grpc.ChannelCredentials):
    server_cert, server_key = pki["server"]
    daemon = Daemon(model, "--tls-cert-file", str(server_cert), "--tls-key-file", str(server_key), *flags,
                    *SMALL_KV_CACHE, log_path=tmp_path_factory.mktemp("tls") / "daemon.log", channel_credentials=creds)
    yield from serve(daemon)


@pytest.fixture(scope="module")
def tls(tiny_model_dir, pki, tmp_path_factory):
    yield from tls_daemon(tiny_model_dir[0], pki, tmp_path_factory, creds=credentials(pki["server_ca"]))


@pytest.fixture(scope="module")
def mtls(tiny_model_dir, pki, tmp_path_factory):
    yield from tls_daemon(tiny_model_dir[0], pki, tmp_path_factory, "--tls-client-ca-file",
                          str(pki["client_ca"][0]), creds=credentials(pki["server_ca"], pki["client"]))


def generates_over(daemon: Daemon) -> None:
    with daemon.channel() as channel:
        response = generate_pb2_grpc.GenerationStub(channel).Generate(token_request(4), timeout=TIMEOUT)
    assert len(response.token_ids) == 4 and response.finish_reason == pb.FINISH_REASON_LENGTH


def test_tls_client_trusting_the_server_ca_is_served(tls):
    generates_over(tls)
    assert tls.health() == "SERVING"


def test_tls_refuses_plaintext_clients(tls):
    assert model_info_code(tls.address, None) == grpc.StatusCode.UNAVAILABLE


def test_tls_client_trusting_another_ca_refuses_the_server(tls, pki):
    assert model_info_code(tls.address, credentials(pki["other_ca"])) == grpc.StatusCode.UNAVAILABLE


def test_mtls_client_with_a_cert_from_the_client_ca_is_served(mtls):
    generates_over(mtls)


def test_mtls_refuses_clients_without_a_cert(mtls, pki):
    assert model_info_code(mtls.address, credentials(pki["server_ca"])) == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_client_certs_from_another_ca(mtls, pki):
    creds = credentials(pki["server_ca"], pki["rogue_client"])
    assert model_info_code(mtls.address, creds) == grpc.StatusCode.UNAVAILABLE

