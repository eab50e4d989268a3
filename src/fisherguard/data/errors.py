"""The data room's two errors: a dataset's files are missing, or one of them fails a check.

This module imports nothing else of the package, so every other data module (readers, lookup,
checksums, fetch) can raise these without importing one another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

__all__ = ["DatasetMissingError", "DatasetCorruptError"]


class DatasetMissingError(FileNotFoundError):
    """The dataset's files are not in any searched directory.

    The message lists the directories searched, the expected files and the commands (the
    project's ``fisherguard data fetch`` and the plain shell one) that put them in place.
    """

    def __init__(
        self,
        message: str,
        *,
        dataset: str | None = None,
        searched: Iterable[Path] = (),
        expected: Iterable[str] = (),
        commands: Iterable[str] = (),
    ) -> None:
        super().__init__(message)
        self.dataset = dataset
        self.searched = [Path(p) for p in searched]
        self.expected = list(expected)
        self.commands = list(commands)

    def __str__(self) -> str:  # FileNotFoundError would otherwise format errno/filename
        return str(self.args[0]) if self.args else ""


class DatasetCorruptError(ValueError):
    """A dataset file fails a check (header, length, label range, counts or checksum).

    ``path`` and ``check`` name the file and the failing check; loaders add the dataset, the
    directories searched and the fetch commands to the message.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        check: str | None = None,
        dataset: str | None = None,
        commands: Iterable[str] = (),
    ) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.check = check
        self.dataset = dataset
        self.commands = list(commands)
