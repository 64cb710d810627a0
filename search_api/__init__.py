"""FastAPI search service: settings, state, routes, schemas."""
