"""The error every experiment raises for input the user can fix."""


class ConfigError(ValueError):
    """An experiment that cannot run as asked; the message names the problem and the fix."""
