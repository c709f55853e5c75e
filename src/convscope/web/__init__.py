"""The live explorer (``convscope serve``): a FastAPI app, Jinja2 templates and a little vanilla JS.

``create_app(model, atlas=None, ...)`` builds the app; the model work it does lives in
:class:`~convscope.web.service.Explorer` and runs on one :class:`~convscope.web.worker.ModelWorker`.
"""

from .app import create_app

__all__ = ["create_app"]
