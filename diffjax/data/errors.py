"""The one exception of the data package."""


class DataError(ValueError):
    """Data cannot be read as configured; the message says what is wrong and how to fix it."""
