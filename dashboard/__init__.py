"""The operator's dashboard: its own process (``python -m consumers dashboard``), never part
of the public signup app. It shows the pipeline live from one Redis round trip per refresh,
behind HTTP Basic auth, with its own script and stylesheet and a strict
Content-Security-Policy."""
