"""Running the system outside the package code: the Dockerfiles and docker-compose helpers, the
no-Docker stack (`local_stack.sh`), and the local servers the tests, benchmarks and that stack
start (`local_s3`: SeaweedFS, `local_milvus`: Milvus standalone, `ports`: free loopback ports).
Run a server module with `python -m deploy.local_s3` / `python -m deploy.local_milvus`."""
