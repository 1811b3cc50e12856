"""slimserve's offline half: data -> train -> export -> verify -> register into ``models/``.

Heavy imports (torch, scikit-learn) happen in the submodules, not here.
"""
