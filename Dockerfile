# stax: the edge gateway and the sidecar in one image; `stax` is the entrypoint.
#
#   docker build -t stax:dev .
#   docker run --rm stax:dev demo                    # the tour, all inside the container
#   docker run --rm -p 8080:8080 -p 9901:9901 stax:dev   # a gateway on the bundled example graph
#   docker run --rm stax:dev sidecar --redis redis://redis:6379/0 --env team-a --service orders \
#       --app 127.0.0.1:8000 --listen 0.0.0.0:15000 --admin 0.0.0.0:9901
#
# deploy/docker-smoke.sh builds and smoke-runs it; tests/integration/test_deploy.py checks
# what this file claims (stages, user, entrypoint, healthcheck, ports) without a Docker engine.

# -- build: install stax and its runtime dependencies (no test extras) into a venv ----------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# A C compiler for the mypyc-compiled request path (setup.py); only this stage has it.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
# A venv without pip: the runtime image gets stax and its dependencies, not the installer.
RUN python -m venv --without-pip /opt/stax
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY resolver ./resolver
COPY proxy ./proxy
COPY control ./control
# `otlp`: the OTLP/HTTP span exporter, so OTEL_TRACES_EXPORTER=otlp works in the image
# The image fails to build rather than ship the interpreted request path by accident.
RUN pip --python /opt/stax/bin/python install ".[otlp]" \
 && /opt/stax/bin/stax --help >/dev/null \
 && cd / && /opt/stax/bin/python -c "import proxy, sys; sys.exit(not proxy.compiled())"

# -- runtime: slim base, the venv, a non-root user --------------------------------------------
FROM python:3.11-slim AS runtime
ENV PATH=/opt/stax/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 stax \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin stax
COPY --from=build /opt/stax /opt/stax
# The default graph of the default command (a gateway); mount your own over it.
COPY deploy/graph.example.yaml /etc/stax/graph.yaml
USER 10001:10001
WORKDIR /tmp

# 8080: gateway listener; 15000: sidecar ingress; 9901: admin (/healthz /readyz /metrics).
# The sidecar egress (15001) is for the app in the same pod only and binds 127.0.0.1.
EXPOSE 8080 15000 9901

# Slim images have no curl. The opener ignores HTTP_PROXY: a proxy set for the app must not
# carry the probe. Any non-2xx or a refused connection raises, and python exits 1.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:9901/healthz', timeout=2)"]

ENTRYPOINT ["stax"]
CMD ["gateway", "--graph", "/etc/stax/graph.yaml", "--listen", "0.0.0.0:8080", "--admin", "0.0.0.0:9901"]
