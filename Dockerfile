FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install . && useradd --system --uid 10001 sidecar

USER 10001
# Inside a container the sidecar must listen on all interfaces to be reachable from its neighbours.
ENV SIDECAR_LISTEN=0.0.0.0:8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/-/healthz').status != 200)"]
ENTRYPOINT ["cognito-sidecar"]
CMD ["serve"]
