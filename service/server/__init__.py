"""The server's processes: the supervisor that ``python -m service`` runs, its workers (the
BentoML service on uvicorn), and the limits on their HTTP connections."""
