"""The HTTP surface: FastAPI app, routes, schemas, auth, prediction serving, CLI and client."""
