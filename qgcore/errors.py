"""Errors every stage raises, each with its own exit code, so CI can tell causes apart.

The split follows coverage.py: 0 ok, 1 tool broke, 2 the gate said no. Bad *input* gets its own code
(3 and up) so a pipeline can say "fix your recipe" rather than "something failed".
Stdlib only: the gate and the CLI import this without pulling torch.
"""

from __future__ import annotations

import difflib

EXIT_OK = 0
EXIT_ERROR = 1  # tool error, or a missing/invalid artifact
EXIT_GATE_REJECTED = 2  # the gate ran and promoted nothing (or not the required variant)
EXIT_CONFIG = 3  # recipe / policy / CLI value invalid, unknown name
EXIT_MODEL_NOT_FOUND = 4  # local path or hub id does not exist
EXIT_HUB_UNREACHABLE = 5  # hub cannot be reached for a model / calibration data, or access is refused (gated)
EXIT_GROUP_SIZE = 6  # group size does not divide a targeted layer
EXIT_UNSUPPORTED_HW = 7  # the declared target GPU cannot run the scheme
EXIT_NO_SPACE = 8  # out of disk
EXIT_PARTIAL = 9  # some variants failed (server would not start, died, ...); the rest finished

EXIT_CODES = {
    EXIT_OK: "ok",
    EXIT_ERROR: "tool error or missing/invalid artifact",
    EXIT_GATE_REJECTED: "gate rejected: no variant (or not the required one) may be promoted",
    EXIT_CONFIG: "invalid configuration (recipe, policy or option)",
    EXIT_MODEL_NOT_FOUND: "model not found",
    EXIT_HUB_UNREACHABLE: "hub unreachable for a model or calibration data, or a gated dataset",
    EXIT_GROUP_SIZE: "group size does not divide a targeted layer",
    EXIT_UNSUPPORTED_HW: "scheme unsupported on the declared target GPU",
    EXIT_NO_SPACE: "out of disk space",
    EXIT_PARTIAL: "some variants failed; finished ones were kept",
}


class QuantgateError(Exception):
    """A failure the user can act on: one line of text and an exit code."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(QuantgateError):
    exit_code = EXIT_CONFIG


class ModelNotFoundError(QuantgateError):
    exit_code = EXIT_MODEL_NOT_FOUND


class HubUnreachableError(QuantgateError):
    exit_code = EXIT_HUB_UNREACHABLE


class DatasetAccessError(QuantgateError):
    """A task's dataset exists but access is refused (gated): a token or an access request fixes it."""

    exit_code = EXIT_HUB_UNREACHABLE


class GroupSizeError(QuantgateError):
    exit_code = EXIT_GROUP_SIZE


class UnsupportedHardwareError(QuantgateError):
    exit_code = EXIT_UNSUPPORTED_HW


class NoSpaceError(QuantgateError):
    exit_code = EXIT_NO_SPACE


class IntegrityError(QuantgateError):
    """A checkpoint file differs from what the manifest recorded: its measurements no longer apply."""

    exit_code = EXIT_ERROR


class ToolError(QuantgateError):
    """quantgate itself broke (a parser met output it does not understand): exit 1, never a verdict."""

    exit_code = EXIT_ERROR


class ArtifactError(QuantgateError):
    """A stage's input artifact is missing or does not validate."""

    exit_code = EXIT_ERROR


def hub_download_error(err: OSError, what: str, fix: str) -> QuantgateError:
    """What an OSError while fetching `what` from the Hugging Face Hub means: out of disk (8), or no hub (5)."""
    import errno

    if err.errno == errno.ENOSPC:
        return NoSpaceError(f"out of disk while downloading {what}: free space under HF_HOME")
    return HubUnreachableError(f"cannot reach the Hugging Face Hub for {what} ({type(err).__name__}); {fix}")


def did_you_mean(name: str, choices: list[str] | tuple[str, ...], what: str) -> str:
    """`Unknown recipe 'fp4'. Did you mean: nvfp4? Available: ...` (lm-eval's registry style)."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    listing = ", ".join(sorted(choices)) if len(choices) <= 30 else f"{len(choices)} names"
    return f"Unknown {what} '{name}'.{hint} Available: {listing}"


def _fields_at(schema: object, path: tuple[object, ...]) -> list[str]:
    """The field names of the (pydantic model or dataclass) type found at `path` inside `schema`."""
    import dataclasses
    import typing

    t: object = schema
    for key in path:
        fields = getattr(t, "model_fields", None)
        if isinstance(fields, dict):
            t = fields[key].annotation if key in fields else None
        elif isinstance(t, type) and dataclasses.is_dataclass(t):
            t = typing.get_type_hints(t).get(str(key))
        else:
            return []
    if isinstance(t, type) and dataclasses.is_dataclass(t):
        return [f.name for f in dataclasses.fields(t)]
    return list(getattr(t, "model_fields", None) or [])


def format_validation_error(source: object, err: Exception, schema: object = None) -> str:
    """One line for a pydantic ValidationError: `<source>: <field.path>: <what>` (strict schemas); with the
    `schema` validated against, an unknown key names the closest known ones."""
    errors = getattr(err, "errors", None)
    if not callable(errors):
        return f"{source}: {err}"
    e = errors()[0]
    loc = ".".join(str(x) for x in e["loc"] if x != "[key]") or "(top level)"
    if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        what = "unknown key (the schema is strict)"
        path = tuple(x for x in e["loc"] if x != "[key]")
        close = difflib.get_close_matches(str(path[-1]), _fields_at(schema, path[:-1]), n=3, cutoff=0.5) \
            if schema is not None and path else []
        if close:
            what += f"; did you mean: {', '.join(close)}?"
    elif e["type"] == "literal_error":
        names = [n.strip().strip("'") for n in str(e.get("ctx", {}).get("expected", "")).replace(" or ", ", ")
                 .split(",") if n.strip()]
        what = did_you_mean(str(e.get("input")), names, "value")
    else:
        what = str(e["msg"]).removeprefix("Value error, ")
        head = what.split(":", 1)[0]
        if ":" in what and loc.endswith(head):  # a section's own check already names where it is
            what = what.split(":", 1)[1].strip()
    return f"{source}: {loc}: {what}"
