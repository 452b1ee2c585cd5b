-- Run once by the postgres image on an empty data folder (/docker-entrypoint-initdb.d), as
-- POSTGRES_USER, after it created POSTGRES_DB (prefect): MLflow's own database, owned by the
-- same user. Prefect and MLflow each migrate their schema on first start.
CREATE DATABASE mlflow;
