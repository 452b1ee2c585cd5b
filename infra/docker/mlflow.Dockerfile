# The MLflow tracking server of infra/docker-compose.yml: PostgreSQL back end (psycopg2),
# artifacts in S3/MinIO (boto3), served through the server (--serve-artifacts).
FROM python:3.11-slim

RUN pip install --no-cache-dir "mlflow==3.17.*" psycopg2-binary boto3 \
    && useradd --create-home --uid 1000 mlflow

USER mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host=0.0.0.0", "--port=5000"]
