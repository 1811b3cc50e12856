"""Which models share a deployment: ``SLIMSERVE_RAY_GROUPS`` read once, asked everywhere.

A group names models or shell patterns (``text-*``); a model belongs to the first group, in
the order the setting lists them, with a name or pattern that matches it, and every model no
group claims belongs to the group ``default``. The same rule decides where the router sends a
request and which models a replica loads, so a model added to the repository later (poll
mode) is served by the group it matches, without a redeploy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from ..core.repository import ModelNotFoundError, ModelRepository
from ..core.settings import ModelGroup, RayServeSettings

__all__ = ["DEFAULT_GROUP", "Group", "Grouping", "GroupRepository"]

DEFAULT_GROUP = "default"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class Group:
    name: str
    patterns: tuple[str, ...]  # empty: the default group (every model no other group claims)
    num_replicas: int | None = None
    autoscaling: dict[str, Any] | None = None


@dataclass(frozen=True)
class Grouping:
    """The groups in the order they claim models; the default group last, when it exists."""

    groups: tuple[Group, ...]
    claimed: tuple[Group, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "claimed", tuple(g for g in self.groups if g.patterns))

    @classmethod
    def from_settings(cls, settings: RayServeSettings, names: list[str]) -> Grouping:
        """The configured groups, and ``default`` when some model of ``names`` (the
        repository's) is claimed by none or no group is configured. :class:`ValueError` with
        the setting's name for a bad group name or a group that matches no model."""
        groups = []
        for name, spec in settings.groups.items():
            spec = spec if isinstance(spec, ModelGroup) else ModelGroup(models=spec)
            if not _NAME.match(name) or name == DEFAULT_GROUP:
                raise ValueError(
                    f"SLIMSERVE_RAY_GROUPS: group name {name[:64]!r} is not allowed; expected "
                    "letters, digits, '-' and '_' (at most 63), and not 'default' (the group "
                    "of every model no other group names)"
                )
            groups.append(Group(name, tuple(spec.models), spec.num_replicas, spec.autoscaling))
        grouping = cls(tuple(groups))
        for group in grouping.claimed:
            if not any(grouping.group_of(n) is group for n in names):
                raise ValueError(
                    f"SLIMSERVE_RAY_GROUPS: group {group.name!r} ({', '.join(group.patterns)}) "
                    f"serves no model of the repository (models: {', '.join(names) or 'none'})"
                )
        if not groups or any(grouping.group_of(n) is None for n in names):
            grouping = cls((*groups, Group(DEFAULT_GROUP, ())))
        return grouping

    def group_of(self, model: str) -> Group | None:
        """The group that serves ``model``: the first that claims it, else ``default`` (None
        when there is no default group)."""
        for group in self.claimed:
            if any(fnmatchcase(model, p) for p in group.patterns):
                return group
        return self.groups[-1] if self.groups and not self.groups[-1].patterns else None

    def __getitem__(self, name: str) -> Group:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(name)


class GroupRepository(ModelRepository):
    """The repository as one group sees it: only the models the group serves."""

    def __init__(self, root: str | Path, grouping: Grouping, group: str) -> None:
        super().__init__(root)
        self.grouping = grouping
        self.group = grouping[group]

    def serves(self, name: str) -> bool:
        return self.grouping.group_of(name) is self.group

    def names(self) -> list[str]:
        return [n for n in super().names() if self.serves(n)]

    def versions(self, name: str) -> list[int]:
        if not self.serves(name):
            known = ", ".join(self.names()) or "none"
            raise ModelNotFoundError(
                f"model {name!r} is not served by group {self.group.name!r} (models: {known})"
            )
        return super().versions(name)
