"""Where pyhcs keeps its state: the state root (registry, layers) and the run root.

Defaults are ``/var/lib/pyhcs`` and ``/run/pyhcs``; the environment variables
``PYHCS_ROOT`` and ``PYHCS_RUN_ROOT`` override them, and every API that touches
state accepts explicit roots too, which win over both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Roots", "DEFAULT_ROOT", "DEFAULT_RUN_ROOT"]

DEFAULT_ROOT = "/var/lib/pyhcs"
DEFAULT_RUN_ROOT = "/run/pyhcs"


@dataclass(frozen=True, slots=True)
class Roots:
    """The pair of directories one pyhcs installation uses."""

    root: Path
    run_root: Path

    @classmethod
    def resolve(cls, root: str | os.PathLike[str] | None = None,
                run_root: str | os.PathLike[str] | None = None) -> Roots:
        """Explicit arguments first, then ``PYHCS_ROOT`` / ``PYHCS_RUN_ROOT``, then the defaults."""
        r = Path(root or os.environ.get("PYHCS_ROOT") or DEFAULT_ROOT).absolute()
        rr = Path(run_root or os.environ.get("PYHCS_RUN_ROOT") or DEFAULT_RUN_ROOT).absolute()
        return cls(r, rr)

    @property
    def db_path(self) -> Path:
        return self.root / "registry.db"

    @property
    def layers_dir(self) -> Path:
        return self.root / "layers"

    def container_run_dir(self, container_id: str) -> Path:
        return self.run_root / "containers" / container_id
