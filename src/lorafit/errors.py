"""One exception for user mistakes, so the CLI can print it without a traceback.

Every message has three parts, as users need them: what is wrong (naming the file, line or key), why it
matters, and how to fix it.
"""

from __future__ import annotations


class LorafitError(Exception):
    """A problem the user can fix: bad config, bad data, a missing file. The CLI exits 1 and prints it."""

    def __init__(self, what: str, *, why: str | None = None, fix: str | None = None, details: list[str] | None = None):
        self.what, self.why, self.fix = what, why, fix
        self.details = list(details or [])
        super().__init__(self.render())

    def render(self) -> str:
        lines = [self.what]
        lines += [f"  {d}" for d in self.details]
        if self.why:
            lines.append(f"  why: {self.why}")
        if self.fix:
            lines.append(f"  fix: {self.fix}")
        return "\n".join(lines)


def install_hint(extra: str, installs: str) -> str:
    """How to add an optional extra. lorafit is installed from its checkout (`make`), not from a package index, so
    ``pip install 'lorafit[x]'`` fails as written; and a bare ``pip`` may not be the environment's."""
    return (f".venv/bin/python -m pip install -e '.[{extra}]' in the lorafit checkout (installs {installs}; use the "
            "python of the environment lorafit runs in if it is not .venv)")
