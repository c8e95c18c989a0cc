# The sidecar image: add it as a second container next to an unmodified Triton or TF Serving.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --uid 10001 --no-create-home sidecar
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
# 9000: data port (the model server's HTTP protocol); 9090: probes and /metrics.
EXPOSE 9000 9090
ENTRYPOINT ["sidecar", "run"]
CMD ["--upstream", "http://127.0.0.1:8000", "--protocol", "auto", "--listen", "0.0.0.0:9000", "--admin", "0.0.0.0:9090"]
