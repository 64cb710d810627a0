"""Indexing: Flickr8k into the object store (ingest), images embedded (pipeline) and kept in a
vector index behind one interface (vector_index; backends faiss_index and milvus_index), by hand
(`python -m indexer`, cli) or fanned out as the DAGs' tasks (jobs, shards), and checked against
the store (verify: the published version holds exactly the store's images)."""
