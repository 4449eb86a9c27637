# vitcache server image. CPU by default; on a GPU host run with --device cuda and the NVIDIA runtime
# (torch from requirements.lock brings its CUDA libraries where PyPI's build has them).
FROM python:3.11-slim
WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
RUN pip install --no-cache-dir -r requirements.lock
COPY vitcache vitcache
COPY server server
COPY client client
COPY proto proto
RUN pip install --no-cache-dir --no-deps .
ENV VITCACHE_HOME=/var/cache/vitcache
EXPOSE 50051 9400
ENTRYPOINT ["vitcache"]
CMD ["serve", "--host", "0.0.0.0", "--model", "tiny-random"]
