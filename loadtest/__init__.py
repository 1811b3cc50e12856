"""Load tests and benchmarks of the running server (``make bench``); never imported by service/."""
