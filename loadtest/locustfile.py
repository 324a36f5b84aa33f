"""Locust, for those who already use it: sign up a new user per request.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless \\
           --users 64 --spawn-rate 64 --run-time 30s

Each simulated user posts signups back to back (no wait time: a closed loop like
``python -m loadtest --concurrency``). A 201 is a success; anything else is a failure named by
its status and error code. Locust's Python client costs more CPU per request than
``python -m loadtest`` or wrk, so on one machine it saturates sooner: watch its CPU.
"""

from __future__ import annotations

import itertools
import uuid

from locust import FastHttpUser, task

_RUN = uuid.uuid4().hex[:8]
_NUMBERS = itertools.count(1)


class Signup(FastHttpUser):
    """A client signing up new users, one after another."""

    @task
    def sign_up(self) -> None:
        name = f"lc_{_RUN}_{next(_NUMBERS)}"
        body = {"username": name, "email": f"{name}@example.com"}
        with self.client.post(
            "/signup", json=body, name="POST /signup", catch_response=True
        ) as response:
            if response.status_code == 201:
                response.success()
            else:
                try:
                    code = response.json().get("error", "?")
                except ValueError:  # a body that is not JSON is the failure itself
                    code = "not JSON"
                response.failure(f"{response.status_code} {code}")
