"""The peer: the classic design this project rewrites, as it is usually written. Flask, a
blinker signal, and two receivers that each LPUSH a job with the sync Redis client after the
request is handled. Runs in the benchmark-only environment.

``gunicorn loadtest.bench.flask_peer:app --worker-class gthread --workers 2 --threads 8``
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import redis
from blinker import Namespace
from flask import Flask, jsonify, request

app = Flask(__name__)
signals = Namespace()
user_signed_up = signals.signal("user-signed-up")
client = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))


@user_signed_up.connect
def enqueue_welcome_email(sender: Any, **extra: Any) -> None:
    client.lpush("peer:queue:email", json.dumps({"type": "welcome_email", **extra}))


@user_signed_up.connect
def enqueue_profile(sender: Any, **extra: Any) -> None:
    client.lpush("peer:queue:profile", json.dumps({"type": "generate_profile", **extra}))


@app.post("/signup")
def signup() -> Any:
    data = request.get_json(silent=True) or {}
    username, email = data.get("username"), data.get("email")
    if not isinstance(username, str) or not isinstance(email, str) or "@" not in email:
        return jsonify(error="validation"), 422
    user_id = uuid.uuid4().hex
    user_signed_up.send(app, user_id=user_id, username=username, email=email)
    return jsonify(user_id=user_id, username=username, email=email), 201
