"""One router per resource; `serving.app` includes them all."""

from serving.routes import admin, feedback, ops, predict, v2

ROUTERS = (ops.router, predict.router, feedback.router, admin.router, v2.router)
