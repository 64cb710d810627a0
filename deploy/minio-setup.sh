#!/bin/sh
# docker-compose `minio-setup`: create the bucket(s) once MinIO is up; safe to run again.
set -eu
until mc alias set local "http://${MINIO_HOST:-minio:9000}" "$MINIO_ACCESS_KEY" "$MINIO_SECRET_KEY" >/dev/null 2>&1; do
  echo "waiting for MinIO..."; sleep 2
done
for bucket in ${MINIO_BUCKET:-flickr8k} ${MINIO_EXTRA_BUCKETS:-}; do
  mc mb --ignore-existing "local/$bucket"
  mc anonymous set none "local/$bucket" >/dev/null
done
echo "minio-setup: buckets ready"
