"""Least privilege for every non-admin user (the GPU user) of `pagating server`: MLflow's basic auth,
plus a list of the only writes such a user may make.

MLflow's basic-auth app lets any logged-in user create experiments, registered models, prompts,
webhooks, gateway secrets, scorers, ... (it then makes that user their MANAGE owner), so a stolen
GPU password could create and fill resources of its own. The app's documented extension point is
the `authorization_function` of its config file (`pagating server` writes ours there): MLflow calls
it before every protected request, on the Flask routes (REST `/api/` and the UI's `/ajax-api/`) and,
through its bridge, on the FastAPI ones (gateway, OTLP traces, jobs). A Response it returns is the
answer. Ours authenticates exactly as MLflow's own (`authenticate_request_basic_auth`, its cache
included), then lets a non-admin through only for reads and for the writes a training run makes:
runs and their metrics, params, tags, inputs and models, claim tags on an experiment, logged models,
artifact uploads. MLflow's own validators still decide *which* experiments (EDIT on granted ones).
"""

from __future__ import annotations

import os
import re

# (method, path) a non-admin may write, with /ajax-api/ read as /api/ and MLflow's static prefix cut off.
ALLOWED_WRITES = [(method, re.compile(pattern)) for method, pattern in [
    ("POST", r"/api/2\.0/mlflow/runs/(create|update|search|log-batch|log-metric|log-parameter|log-inputs"
             r"|log-model|outputs|set-tag|delete-tag)"),
    ("POST", r"/api/2\.0/mlflow/experiments/(search|set-experiment-tag|delete-experiment-tag)"),
    ("POST", r"/api/2\.0/mlflow/logged-models(/search|/[^/]+/params)?"),
    ("PATCH", r"/api/2\.0/mlflow/logged-models/[^/]+(/tags)?"),
    ("PUT", r"/api/2\.0/mlflow-artifacts/artifacts/.+"),
    ("POST", r"/api/2\.0/mlflow-artifacts/mpu/(create|complete|abort)/.+"),
]]
READS = ("GET", "HEAD", "OPTIONS")


def normalise(path: str) -> str:
    prefix = os.environ.get("_MLFLOW_STATIC_PREFIX", "")  # `mlflow server --static-prefix`
    if prefix and path.startswith(prefix):
        path = path[len(prefix):]
    return "/api/" + path[len("/ajax-api/"):] if path.startswith("/ajax-api/") else path


def allowed_write(method: str, path: str) -> bool:
    path = normalise(path)
    return any(method == m and pattern.fullmatch(path) for m, pattern in ALLOWED_WRITES)


def authenticate():
    """MLflow's `authorization_function` contract: the request's Authorization, or a Response."""
    from flask import request
    from mlflow.server import auth
    from werkzeug.datastructures import Authorization

    result = auth.authenticate_request_basic_auth()
    if not isinstance(result, Authorization) or request.method in READS or allowed_write(request.method,
                                                                                        request.path):
        return result
    if auth.store.get_user(result.username).is_admin:
        return result
    return auth.make_forbidden_response()
