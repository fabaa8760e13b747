"""Base for every stage's JSON artifact: strict, written atomically, read with a one-line error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from qgcore.errors import ArtifactError


class Artifact(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # what to run when the file is missing or invalid, for the error message
    producer: ClassVar[str] = "the stage that writes it"

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.model_dump_json(indent=1) + "\n")
        tmp.replace(path)  # atomic: a reader never sees half a file

    @classmethod
    def read(cls, path: Path):  # noqa: ANN206 - returns cls
        if not path.is_file():
            raise ArtifactError(f"missing {path}: run {cls.producer} first")
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except (ValidationError, json.JSONDecodeError) as err:
            raise ArtifactError(f"invalid {path}: {str(err).splitlines()[0]}; rerun {cls.producer}") from None
