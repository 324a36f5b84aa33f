"""Tools for working on the project, not parts of it: ``make run``'s supervisor (devserver),
the embedded Redis server the suite and ``make run`` start (embedded_redis), and the
generator of the README's tables and ``.env.example`` (readme). They run from a checkout;
the built package leaves them out."""
