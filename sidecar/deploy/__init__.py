"""Kubernetes adoption: ``sidecar inject`` (manifests in, manifests with the sidecar out) and
``sidecar webhook`` (the same as a mutating admission webhook).

Both share one function, :func:`sidecar.deploy.inject.inject_pod`, so a pod injected by the CLI
and one injected by the webhook are the same pod.
"""
