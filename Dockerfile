# syntax=docker/dockerfile:1
# One image for the gateway, the worker and the migration job, chosen by command:
#   docker run relay serve --host 0.0.0.0   |   relay worker   |   relay migrate

# --- build: compile wheels (asyncpg, cryptography…) with the build tools ---------
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
RUN pip install --no-cache-dir --upgrade pip==24.3.1 build==1.2.2
COPY pyproject.toml README.md ./
COPY relay ./relay
COPY workers ./workers
COPY migrations ./migrations
RUN python -m build --wheel --outdir /wheels \
 && pip wheel --no-cache-dir --wheel-dir /wheels /wheels/relay-*.whl

# --- runtime: no compilers, no pip cache, a non-root user ----------------------
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid relay --home-dir /nonexistent --shell /usr/sbin/nologin relay
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels /wheels/relay-*.whl \
 && rm -rf /wheels
USER 10001:10001
EXPOSE 8080 9191
# The gateway's liveness; worker and migration pods are probed by Kubernetes instead.
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["relay"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080", "--processes", "1"]
