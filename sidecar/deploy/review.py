"""AdmissionReview v1 in, AdmissionReview v1 out: the webhook's decisions, without any I/O.

Fail open: a pod the webhook cannot inject (a bad annotation, a bug of ours) is admitted
unchanged with a warning that `kubectl` shows, unless the webhook runs with --fail-closed.
Malformed reviews, which the API server never sends, get an HTTP error status with an
AdmissionReview body that says what was wrong; the API server applies the failurePolicy to those.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from .inject import inject_pod
from .patch import diff
from .settings import InjectError, Options

API_VERSION = "admission.k8s.io/v1"
log = logging.getLogger("sidecar.webhook")
Obj = dict[str, Any]


def _review(response: Obj) -> Obj:
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def _status(uid: str, allowed: bool, code: int, message: str) -> Obj:
    response: Obj = {"uid": uid, "allowed": allowed, "status": {"code": code, "message": message}}
    if allowed:
        response["warnings"] = [f"warm-sidecar: not injected: {message}"]
    return _review(response)


def malformed(uid: str, code: int, message: str, fail_closed: bool) -> tuple[int, Obj]:
    log.warning("admission review refused (%d): %s", code, message)
    return code, _status(uid, not fail_closed, code, message)


def answer(body: bytes, opts: Options, fail_closed: bool) -> tuple[int, Obj]:
    """(HTTP status, AdmissionReview) for one request body."""
    try:
        doc = json.loads(body)
    except ValueError:  # includes UnicodeDecodeError
        return malformed("", 400, "request body is not JSON", fail_closed)
    request = doc.get("request") if isinstance(doc, dict) else None
    uid = request.get("uid") if isinstance(request, dict) else None
    uid = uid if isinstance(uid, str) else ""
    if not isinstance(doc, dict) or doc.get("apiVersion") != API_VERSION or doc.get("kind") != "AdmissionReview":
        return malformed(uid, 400, f"expected kind AdmissionReview, apiVersion {API_VERSION}", fail_closed)
    if not isinstance(request, dict) or not uid:
        return malformed(uid, 400, "AdmissionReview has no request with a uid", fail_closed)
    try:
        ops, notes = _patch(request, opts)
    except InjectError as e:
        log.warning("admission %s %s: not injected: %s", uid, _who(request), e)
        return 200, _status(uid, not fail_closed, 400, str(e))
    except Exception as e:  # a bug of ours must not stop pods from being created
        log.error("admission %s %s: internal error (%s)", uid, _who(request), type(e).__name__,
                  exc_info=log.isEnabledFor(logging.DEBUG))
        return 200, _status(uid, not fail_closed, 500, "internal error in the warm-sidecar webhook")
    response: Obj = {"uid": uid, "allowed": True}
    if notes:
        response["warnings"] = [f"warm-sidecar: {note}" for note in notes]
    if ops:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()
    log.info("admission %s %s: %s", uid, _who(request), f"injected ({len(ops)} patch operations)" if ops else
             "unchanged")
    return 200, _review(response)


def _dict(value: Any) -> Obj:
    return value if isinstance(value, dict) else {}


def _who(request: Obj) -> str:
    meta = _dict(_dict(request.get("object")).get("metadata"))
    name = meta.get("name") or request.get("name") or f"{meta.get('generateName') or ''}*"
    return f"pod {request.get('namespace') or '-'}/{name}"


def _patch(request: Obj, opts: Options) -> tuple[list[Obj], list[str]]:
    """The JSON Patch for the pod in the request, and notes for the person who created it."""
    if _dict(request.get("kind")).get("kind") != "Pod" or request.get("operation") != "CREATE":
        return [], []  # the webhook configuration sends only pod creations; anything else passes
    pod = request.get("object")
    if not isinstance(pod, dict) or not isinstance(pod.get("spec"), dict):
        raise InjectError("request.object is not a Pod with a spec")
    new_meta, new_spec, outcome = inject_pod(_dict(pod.get("metadata")), pod["spec"], opts)
    if not outcome.injected:
        return [], outcome.notes
    return diff(pod, {**pod, "metadata": new_meta, "spec": new_spec}), outcome.notes
