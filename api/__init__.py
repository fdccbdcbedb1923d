"""The HTTP service: FastAPI app, routes, schemas, auth and prediction serving."""
