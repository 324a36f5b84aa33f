"""Reaction modules that only tests load (through ``REACTIONS``)."""
