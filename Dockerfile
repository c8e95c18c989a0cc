# The warm-sidecar image: `sidecar run` (the default: the sidecar next to Triton / TF Serving),
# `sidecar inject` and `sidecar webhook` (the admission webhook, k8s/webhook) in one image.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY sidecar ./sidecar
# The versions the test suite passed with (constraints.txt), not whatever resolves on build day.
RUN pip wheel --no-cache-dir -c constraints.txt --wheel-dir /wheels .

FROM python:3.11-slim
# Byte code is compiled at install time: the sidecar runs with a read-only root filesystem.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin sidecar
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# 9000 HTTP data port, 9001 gRPC data port, 9090 admin (probes, /metrics, /status),
# 9091 HAProxy agent-check.
EXPOSE 9000 9001 9090 9091
# No HEALTHCHECK: health belongs to Kubernetes' startup/readiness/liveness probes on the admin
# port, which also know the difference between "starting", "warming" and "dead"; Kubernetes
# ignores a Docker HEALTHCHECK, which would only add probe traffic.
ENTRYPOINT ["sidecar"]
# Every setting comes from SIDECAR_* environment variables (see k8s/) or flags after `run`;
# the defaults listen on 0.0.0.0:9000 and :9090 in front of Triton on 127.0.0.1:8000.
CMD ["run"]
