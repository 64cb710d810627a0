"""The index life cycle: object store, ingest, embedding, versioned FAISS indexes."""
