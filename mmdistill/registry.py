"""Name -> factory tables, so configs pick implementations without if-chains."""

from collections.abc import Callable
from typing import Generic, TypeVar

from mmdistill.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of factories; unknown names fail with the list of valid choices."""

    def __init__(self, kind: str, items: dict[str, T] | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = dict(items or {})

    def register(self, *names: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            for name in names:
                if name in self._items:
                    raise ValueError(f"{self.kind} {name!r} registered twice")
                self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            raise UserError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        """Every name, in the order the table lists them."""
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
