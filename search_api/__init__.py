"""The search service: a FastAPI app (`main.create_app`) over one `SearchService`
(`search_service.py`) made of the encoders, the served index version of any backend
(`index_holder.py`) and the stored images; HTTP routes, request bodies and limits, errors,
metrics and the web page around it. Every search takes photo filters (`indexer.photo_filter`),
applied inside the index's search; a text query's dates and places become filters too
(`text_queries.py` over the parser in `query_hints.py`); hits carry their photo's metadata, and
`/images/{key}/info`, `/facets` and `/health` read it from the served version; `/duplicates`
serves the near-duplicate groups `python -m indexer duplicates` found in it. The model is
served from its serving bundle (`encoder.serving`): the service process does not import torch."""
