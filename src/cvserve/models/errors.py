"""What the model store raises: unknown, not built, a failed build, an unusable file."""

from __future__ import annotations


class ModelNotFound(LookupError):
    """No model of that name in the zoo or the store."""

    def __init__(self, name: str, available: list[str] | None = None) -> None:
        self.name = name
        self.available = sorted(available) if available is not None else []
        listed = ", ".join(self.available) or "none"
        super().__init__(f"unknown model {name!r}; available: {listed}")


class ModelNotBuilt(ModelNotFound):
    """A zoo model that has not been built into this store yet."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.available = []
        LookupError.__init__(
            self, f"model {name!r} is not built yet: run `cvserve models build {name}`"
        )


class ModelBuildError(RuntimeError):
    """The build child process failed; ``stderr_tail`` holds the end of its stderr."""

    def __init__(self, name: str, returncode: int, stderr_tail: str) -> None:
        self.name = name
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        lines = [x for x in stderr_tail.strip().splitlines() if x.strip()]
        reason = lines[-1].removeprefix("error: ") if lines else f"exit status {returncode}"
        super().__init__(f"building {name} failed: {reason}")


class InvalidModel(ValueError):
    """A user's ONNX file cannot be served as the given task / preprocessing."""
