"""The serving benchmark (``python -m loadtest.serving``, ``make bench``), split by concern.

``servers`` starts and stops slimserve and the baselines and prepares the models they serve,
``load`` is the closed-loop aiohttp load generator, ``cells`` defines the cells and runs them,
``report`` writes results.json, results.md and the plots, and ``__main__`` is the command line.
"""
