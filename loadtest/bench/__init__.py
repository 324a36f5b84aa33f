"""``make bench``: this service against the bare stack and the classic Flask design, and the
consumers against a hand-written BRPOP loop, arq and SAQ, side by side in one run."""
