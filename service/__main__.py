"""``python -m service`` (what ``make serve`` runs): the supervisor and its workers, settings
from ``SLIMSERVE_*`` (see :mod:`service.server.supervisor`)."""

from __future__ import annotations

from service.server.supervisor import main

if __name__ == "__main__":
    main()
