"""User-facing errors: one line naming the field, the value and what is allowed."""


class EbftError(ValueError):
    """Bad input from the user. The CLI prints ``str(error)`` alone and exits with code 2."""


class ConfigError(EbftError):
    def __init__(self, field: str, value, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}: got {value!r}; {allowed}")


class MaskError(AssertionError):
    """A sparsity mask broke its pattern: a bug, never a user error."""
