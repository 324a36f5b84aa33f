"""The worker process: ``python -m consumers``. Fetches jobs from the queues and runs them."""
