"""`sidecar webhook`: AdmissionReviews for realistic pods in, JSON Patches out (applied with an
independent JSON Patch library and validated strictly); malformed reviews answered, never a
crash; fail open unless --fail-closed; served over real TLS, renewed certificates picked up."""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import ipaddress
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidecar.deploy import review as review_module
from sidecar.deploy.review import answer
from sidecar.deploy.settings import SIDECAR_NAME, Options
from sidecar.deploy.webhook import MAX_BODY, CertReloader, WebhookSettings, make_app
from tests.kube import NATIVE_OLDEST, NEWEST, container, env_of, validate

Obj = dict[str, Any]
OPTS = Options(require_opt_in=True)
SECRET_MARKER = "payload-4b1d"  # appears in pods, must never appear in logs


def _pod(name: str, image: str, args: list[str], ports: list[Obj], annotations: Obj) -> Obj:
    """A pod as the API server hands it to a mutating webhook: created by a ReplicaSet,
    defaulted, with the service-account volume the admission plugin added."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": f"{name}-5d8f7c9b6-", "namespace": "models",
            "labels": {"app": name, "pod-template-hash": "5d8f7c9b6"},
            "annotations": annotations,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{name}-5d8f7c9b6",
                                 "uid": "0d4c1b7e-8a4e-4a53-9b4c-2b1f0f6f1e11", "controller": True,
                                 "blockOwnerDeletion": True}],
        },
        "spec": {
            "containers": [{
                "name": name, "image": image, "args": args, "ports": ports,
                "env": [{"name": "NOTE", "value": SECRET_MARKER}],
                "readinessProbe": {"httpGet": {"path": "/", "port": ports[0]["name"], "scheme": "HTTP"},
                                   "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1,
                                   "failureThreshold": 3},
                "resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}},
                "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent",
                "volumeMounts": [{"name": "kube-api-access-x7k2p", "readOnly": True,
                                  "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
            }],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default", "serviceAccount": "default", "securityContext": {},
            "schedulerName": "default-scheduler", "enableServiceLinks": True,
            "preemptionPolicy": "PreemptLowerPriority", "priority": 0,
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
                             "tolerationSeconds": 300}],
            "volumes": [{"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]}}],
        },
    }


def triton_pod(annotations: Obj | None = None) -> Obj:
    return _pod("triton", "nvcr.io/nvidia/tritonserver:24.10-py3", ["tritonserver", "--model-repository=/models"],
                [{"name": "http", "containerPort": 8000, "protocol": "TCP"},
                 {"name": "grpc", "containerPort": 8001, "protocol": "TCP"}],
                {"warm-sidecar.io/inject": "true"} if annotations is None else annotations)


def tfserving_pod() -> Obj:
    return _pod("tf-serving", "tensorflow/serving:2.16.1-gpu",
                ["--model_name=resnet", "--model_base_path=/models/resnet"],
                [{"name": "http", "containerPort": 8501, "protocol": "TCP"},
                 {"name": "grpc", "containerPort": 8500, "protocol": "TCP"}],
                {"warm-sidecar.io/inject": "true", "warm-sidecar.io/gate-policy": "hold"})


def review(pod: Any, uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002", operation: str = "CREATE",
           kind: str = "Pod") -> Obj:
    return {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": uid, "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": kind},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "models", "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": pod, "oldObject": None, "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def ask(doc: Any, fail_closed: bool = False) -> tuple[int, Obj]:
    return answer(json.dumps(doc).encode(), OPTS, fail_closed)


def patched(pod: Obj, response: Obj) -> Obj:
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    result: Obj = jsonpatch.apply_patch(pod, ops)
    return result


# --- decisions ------------------------------------------------------------------------------

@pytest.mark.parametrize("make_pod", [triton_pod, tfserving_pod])
def test_opted_in_pod_is_patched_into_a_valid_injected_pod(make_pod: Any) -> None:
    pod = make_pod()
    status, doc = ask(review(pod))
    assert status == 200 and doc["apiVersion"] == "admission.k8s.io/v1" and doc["kind"] == "AdmissionReview"
    response = doc["response"]
    assert response["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002" and response["allowed"] is True
    result = patched(pod, response)
    for version in (NATIVE_OLDEST, NEWEST):
        validate(result, version)
    sidecar = container(result["spec"], SIDECAR_NAME)
    assert sidecar["restartPolicy"] == "Always"
    assert result["metadata"]["annotations"]["warm-sidecar.io/status"] == "injected"
    assert "readinessProbe" not in result["spec"]["containers"][0]
    protocol = "triton" if pod["metadata"]["labels"]["app"] == "triton" else "tfserving"
    assert env_of(sidecar)["SIDECAR_UPSTREAM_PROTOCOL"] == protocol
    # Reviewing the injected pod again (reinvocation) changes nothing.
    assert "patch" not in ask(review(result))[1]["response"]


@pytest.mark.parametrize("pod", [
    triton_pod({}),  # not opted in
    triton_pod({"warm-sidecar.io/inject": "false"}),
    triton_pod({"warm-sidecar.io/inject": "true", "warm-sidecar.io/status": "injected"}),
])
def test_pods_not_asking_for_it_pass_unchanged(pod: Obj) -> None:
    status, doc = ask(review(pod))
    assert status == 200 and doc["response"] == {"uid": doc["response"]["uid"], "allowed": True}


@pytest.mark.parametrize(("operation", "kind"), [("UPDATE", "Pod"), ("CREATE", "Deployment")])
def test_other_requests_pass_unchanged(operation: str, kind: str) -> None:
    status, doc = ask(review(triton_pod(), operation=operation, kind=kind))
    assert status == 200 and doc["response"]["allowed"] is True and "patch" not in doc["response"]


def test_pod_without_a_model_server_is_admitted_with_a_warning() -> None:
    pod = triton_pod()
    pod["spec"]["containers"][0].update(image="nginx", args=[])
    pod["spec"]["containers"][0]["ports"] = [{"name": "http", "containerPort": 80}]
    _, doc = ask(review(pod))
    assert doc["response"]["allowed"] is True and "patch" not in doc["response"]
    assert doc["response"]["warnings"] == ["warm-sidecar: no Triton or TF Serving container found; left unchanged"]


def test_bad_annotation_fails_open_unless_fail_closed() -> None:
    pod = triton_pod({"warm-sidecar.io/inject": "true", "warm-sidecar.io/gate-policy": "wait"})
    _, doc = ask(review(pod))
    response = doc["response"]
    assert response["allowed"] is True and "patch" not in response
    assert "annotation warm-sidecar.io/gate-policy: invalid value 'wait'" in response["warnings"][0]
    status, doc = ask(review(pod), fail_closed=True)
    assert status == 200 and doc["response"]["allowed"] is False
    assert doc["response"]["status"]["code"] == 400
    assert "gate-policy" in doc["response"]["status"]["message"]


def test_internal_error_fails_open_without_a_traceback(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    def broken(*_args: Any) -> Any:
        raise RuntimeError(f"bug holding {SECRET_MARKER}")

    monkeypatch.setattr(review_module, "inject_pod", broken)
    with caplog.at_level(logging.INFO, logger="sidecar.webhook"):
        status, doc = ask(review(triton_pod()))
    assert status == 200 and doc["response"]["allowed"] is True
    assert doc["response"]["warnings"] == ["warm-sidecar: not injected: internal error in the warm-sidecar webhook"]
    assert "Traceback" not in json.dumps(doc) and SECRET_MARKER not in json.dumps(doc)
    assert "RuntimeError" in caplog.text and SECRET_MARKER not in caplog.text


def test_logs_never_carry_the_pod(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="sidecar.webhook"):
        ask(review(triton_pod()))
        ask(review(triton_pod({"warm-sidecar.io/inject": "true", "warm-sidecar.io/gate-policy": "wait"})))
    assert "pod models/triton-5d8f7c9b6-*: injected" in caplog.text
    assert SECRET_MARKER not in caplog.text


@pytest.mark.parametrize(("body", "message"), [
    (b"{not json", "request body is not JSON"),
    (b"\xff\xfe", "request body is not JSON"),
    (b"[]", "expected kind AdmissionReview"),
    (json.dumps({**review(triton_pod()), "kind": "Pod"}).encode(), "expected kind AdmissionReview"),
    (json.dumps({**review(triton_pod()), "apiVersion": "admission.k8s.io/v1beta1"}).encode(),
     "expected kind AdmissionReview, apiVersion admission.k8s.io/v1"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(), "no request"),
    (json.dumps(review(triton_pod(), uid="")).encode(), "no request with a uid"),
    (json.dumps({**review(triton_pod()), "request": "x"}).encode(), "no request"),
])
def test_malformed_reviews_get_an_error_review(body: bytes, message: str) -> None:
    status, doc = answer(body, OPTS, False)
    assert status == 400
    assert doc["apiVersion"] == "admission.k8s.io/v1" and doc["kind"] == "AdmissionReview"
    assert doc["response"]["status"]["code"] == 400 and message in doc["response"]["status"]["message"]


@pytest.mark.parametrize("obj", [None, "pod", {"metadata": {}}, {"spec": []}])
def test_a_pod_that_is_not_a_pod_is_answered(obj: Any) -> None:
    status, doc = ask(review(obj))
    assert status == 200 and doc["response"]["allowed"] is True
    assert "not a Pod" in doc["response"]["warnings"][0]


# --- over TLS -------------------------------------------------------------------------------

def write_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost with common name `name`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def client_context(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[str, CertReloader, Path]]:
    cert, key = write_cert(tmp_path, "first")
    tls = CertReloader(str(cert), str(key))
    runner = web.AppRunner(make_app(WebhookSettings(OPTS)))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.context)
    await site.start()
    port = runner.addresses[0][1]
    yield f"https://127.0.0.1:{port}", tls, tmp_path
    await runner.cleanup()


async def test_review_over_https(server: tuple[str, CertReloader, Path]) -> None:
    url, _, directory = server
    pod = triton_pod()
    async with aiohttp.ClientSession() as session:
        ctx = client_context(directory / "tls.crt")
        async with session.post(url + "/inject", json=review(pod), ssl=ctx) as resp:
            assert resp.status == 200
            doc = await resp.json()
        async with session.get(url + "/healthz", ssl=ctx) as resp:
            assert resp.status == 200
    validate(patched(pod, doc["response"]), NATIVE_OLDEST)


async def test_malformed_bodies_over_https(server: tuple[str, CertReloader, Path]) -> None:
    url, _, directory = server
    ctx = client_context(directory / "tls.crt")
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/inject", data=b"<xml/>", ssl=ctx) as resp:
            assert resp.status == 400
            assert (await resp.json())["response"]["status"]["message"] == "request body is not JSON"
        async with session.post(url + "/inject", data=b"x" * (MAX_BODY + 1), ssl=ctx) as resp:
            assert resp.status == 413
            doc = await resp.json()
            assert doc["kind"] == "AdmissionReview" and doc["response"]["status"]["code"] == 413
        async with session.post(url + "/inject", json=review(triton_pod()), ssl=ctx) as resp:
            assert resp.status == 200  # the server is still fine after both


async def _served_common_name(url: str, cert: Path) -> str:
    host, port = url.removeprefix("https://").split(":")
    ctx = client_context(cert)
    _, writer = await asyncio.open_connection(host, int(port), ssl=ctx, server_hostname="localhost")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    name = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return str(name)


async def test_renewed_certificate_is_served_without_restart(server: tuple[str, CertReloader, Path]) -> None:
    url, _, directory = server
    assert await _served_common_name(url, directory / "tls.crt") == "first"
    renewed = directory / "renewed"
    renewed.mkdir()
    cert, key = write_cert(renewed, "second")
    # As the kubelet updates a Secret volume: the new files replace the old ones at once.
    os.replace(key, directory / "tls.key")
    os.replace(cert, directory / "tls.crt")
    assert await _served_common_name(url, directory / "tls.crt") == "second"


async def test_half_written_certificate_keeps_the_old_one(server: tuple[str, CertReloader, Path]) -> None:
    url, _, directory = server
    first = (directory / "tls.crt").read_bytes()
    (directory / "tls.key").write_text("-----BEGIN PRIVATE KEY-----\ntruncated")
    ca = directory / "first.crt"
    ca.write_bytes(first)
    assert await _served_common_name(url, ca) == "first"


# --- the command ----------------------------------------------------------------------------

def _wait_for_line(proc: subprocess.Popen[str], needle: str, deadline: float) -> str:
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        if needle in line:
            return line
    raise AssertionError(f"no {needle!r} in the webhook's log before the deadline")


def test_webhook_command_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    cert, key = write_cert(tmp_path, "cli")
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "webhook", "--cert", str(cert), "--key", str(key),
                             "--listen", "127.0.0.1:0"], stderr=subprocess.PIPE, text=True)
    try:
        line = _wait_for_line(proc, "webhook listening on https://", time.monotonic() + 30)
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        pod = triton_pod()
        body = json.dumps(review(pod)).encode()
        request = urllib.request.Request(f"https://127.0.0.1:{port}/inject", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, context=client_context(cert), timeout=10) as resp:
            doc = json.loads(resp.read())
        assert doc["response"]["allowed"] is True and doc["response"]["patchType"] == "JSONPatch"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_webhook_command_refuses_unusable_certificate(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "sidecar", "webhook", "--cert", str(tmp_path / "no.crt"),
                             "--key", str(tmp_path / "no.key")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith("sidecar webhook: cannot use --cert/--key:")
    assert "Traceback" not in result.stderr


def test_patch_is_minimal_and_leaves_other_fields_alone() -> None:
    pod = triton_pod()
    _, doc = ask(review(pod))
    ops = json.loads(base64.b64decode(doc["response"]["patch"]))
    touched = {op["path"] for op in ops}
    assert "/spec/tolerations" not in touched and "/metadata/ownerReferences" not in touched
    assert all(op["op"] in {"add", "remove", "replace"} for op in ops)
    assert {"op": "add", "path": "/metadata/annotations/warm-sidecar.io~1status", "value": "injected"} in ops
    assert copy.deepcopy(pod) == triton_pod()  # the request object was not mutated
