"""The search service: a FastAPI app (`main.create_app`) over one `SearchService`
(`search_service.py`) made of the encoders, the served index version of any backend
(`index_holder.py`) and the stored images; HTTP routes, request bodies and limits, errors,
metrics and the web page around it. The model is served from its serving bundle
(`encoder.serving`): the service process does not import torch."""
