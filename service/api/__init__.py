"""The web console and REST API (FastAPI + server-rendered Jinja2): ``start_web`` runs it inside
``facesym serve``; ``create_app`` builds the application (tests use it with a TestClient)."""

from service.api.app import ServiceHooks, create_app
from service.api.server import WebHandle, start_web

__all__ = ["ServiceHooks", "WebHandle", "create_app", "start_web"]
