"""The one error type a user sees: printed as a single line, exit status 2, no traceback."""


class FedleakError(Exception):
    """Bad input (config, data file, checkpoint): the message names the file, the field and the fix."""
