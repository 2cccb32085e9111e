"""The one error type a user sees: printed as a single line, exit status 2, no traceback."""


class FedleakError(Exception):
    """Bad input (config, data file, checkpoint): the message names the file, the field and the fix."""


def require_positive(settings, names: tuple[str, ...], prefix: str) -> None:
    """The check every settings dataclass makes on its counts, with the field named as in the config."""
    for name in names:
        value = getattr(settings, name)
        if value < 1:
            raise FedleakError(f"{prefix}{name} = {value}: must be a positive integer")
