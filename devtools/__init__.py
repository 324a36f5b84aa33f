"""Tools for working on the project, not parts of it: ``make run``'s supervisor (devserver),
the embedded Redis server the suite and ``make run`` start (embedded_redis), and the docs'
generated tables and ``.env.example`` (docs, also the site's mkdocs hook). They run from a checkout;
the built package leaves them out."""
