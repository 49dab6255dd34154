# Stub image until the deploy issue: installs monolith-ps and runs one shard.
# The deploy issue replaces it with a slim multi-stage build, a non-root user and
# a gRPC health check.
FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir .
EXPOSE 50051
ENTRYPOINT ["python", "-m", "ps_server"]
CMD ["--port=50051", "--host=0.0.0.0"]
