"""The HTTP reconstruction server: FastAPI app, request guard, job worker and job store."""
