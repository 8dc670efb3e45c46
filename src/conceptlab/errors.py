"""The one exception module: every problem a user can fix raises a ConceptLabError whose message
names what was wrong and what to do about it."""


class ConceptLabError(Exception):
    """A problem with the user's input or set-up; the message says how to fix it."""


class ConfigError(ConceptLabError):
    """A configuration value that cannot work."""


class ConceptDataError(ConceptLabError):
    """Concept images, captions or templates that cannot be used."""


class BackboneError(ConceptLabError):
    """A model folder or hub id that does not hold a usable Stable Diffusion backbone."""


class ConceptFileError(ConceptLabError):
    """A learned-concept file (embedding, hypernetwork) that cannot be read or does not fit."""


class TrainingError(ConceptLabError):
    """Training went wrong in a way the user must act on (a NaN loss, say)."""


def error_line(err: BaseException) -> str:
    """What the entry points print for a user's mistake: `error: <message>` on one line, whatever the message."""
    return "error: " + " ".join(str(err).split())
