"""Load testing the signup pipeline. ``python -m loadtest.drain``: consumer drain rates."""
