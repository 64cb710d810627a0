"""Indexing: Flickr8k or a folder of your own photos into the object store (ingest,
`python -m indexer add`), the store's photos under IMAGES_PREFIX listed (listing: every format
of encoder.image_formats; files the decoders refused remembered), embedded (pipeline), each
photo's metadata read from the same bytes (photo_info: date, camera, position and place, size,
folder), and kept in a vector index behind one interface (vector_index; backends faiss_index
and milvus_index) with each photo's metadata beside its vector (photo_columns, photo_table) and
searched inside a PhotoFilter (photo_filter), by hand (`python -m indexer`, cli) or fanned out
as the DAGs' tasks (jobs, shards), checked against the store (verify: the published version
holds exactly the store's images), and searched for groups of near-duplicate photos
(duplicates: a range search around each vector, the candidates confirmed on the photos' pixels
by duplicate_check, `python -m indexer duplicates`)."""
