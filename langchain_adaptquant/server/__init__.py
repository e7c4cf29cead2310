"""The monitoring REST API, an OpenAI-compatible chat endpoint and a live dashboard (FastAPI).

Needs the ``server`` extra (fastapi, uvicorn, prometheus-client). ``create_app`` builds the app;
``adaptquant serve`` runs it with uvicorn on 127.0.0.1.
"""

from langchain_adaptquant.server.app import create_app

__all__ = ["create_app"]
