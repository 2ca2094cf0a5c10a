"""A model's chat template: parsed once, rendered in Jinja's sandbox under limits.

The template comes with the model, so it is code from the model's author. The sandbox keeps it
away from Python's internals; the limits here keep it from hanging the caller or taking its
memory (`{{ 'a' * 10**10 }}`, nested `range(100000)` loops, a string doubled in a loop):
- numbers given to any call, filter or repetition, and the widths of formatted fields, are at
  most LARGEST_ARGUMENT, and `**` at most EXPONENT_BITS bits, so no single step makes gigabytes;
- a render runs under a tracer that ends it after TIME_LIMIT seconds or once the process has
  grown by MEMORY_LIMIT bytes (both checked at every line of the template).
A template that breaks a limit or raises fails that one render with one line; the chat goes on.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
import time
from datetime import datetime

from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import EdgeLLMError

TIME_LIMIT = 5.0  # seconds per render
MEMORY_LIMIT = 256 << 20  # bytes the process may grow by during one render
LARGEST_ARGUMENT = 1 << 20  # characters / repetitions / widths a template may ask for at once
EXPONENT_BITS = 4096
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class ChatTemplate:
    def __init__(self, source: str, where: str):
        """where: the file the template came from, named by every error."""
        self.where = where
        if not isinstance(source, str):
            raise EdgeLLMError(f"{where}: the chat template is a {type(source).__name__}, not text")
        env = _LimitedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except Exception as e:  # noqa: BLE001 (Jinja's syntax errors and whatever its parser meets)
            raise EdgeLLMError(f"{where}: the chat template does not parse ({type(e).__name__}: {_short(e)})") from None

    def render(self, what: str = "these messages", **values) -> str:
        """what: the input, as the error names it."""
        limits = _Limits()
        previous = sys.gettrace()
        sys.settrace(limits.trace)
        try:
            return self._template.render(**values)
        except _LimitExceeded as e:
            raise EdgeLLMError(f"{self.where}: the chat template {e}") from None
        except MemoryError:
            raise EdgeLLMError(f"{self.where}: the chat template ran out of memory") from None
        except Exception as e:  # noqa: BLE001 (the template's own raise_exception, a missing key, ...)
            raise EdgeLLMError(f"{self.where}: the chat template failed on {what}: {type(e).__name__}: {_short(e)}") from None
        finally:
            sys.settrace(previous)


class _LimitExceeded(Exception):
    pass


class _LimitedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**", "%"])

    def __init__(self, **options):
        super().__init__(**options)
        self.filters = {name: _checked(name, f) for name, f in self.filters.items()}

    def call_binop(self, context, operator, left, right):
        if operator == "*":  # (a repetition; numbers multiply freely)
            for count, item in ((left, right), (right, left)):
                if isinstance(count, int) and hasattr(item, "__len__") and count * len(item) > LARGEST_ARGUMENT:
                    raise _LimitExceeded(f"asked for {count} x {len(item)} items (limit {LARGEST_ARGUMENT})")
        if operator == "%" and isinstance(left, str):
            _check_widths(_PERCENT_WIDTHS, left)
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            if right * math.log2(abs(left)) > EXPONENT_BITS:
                raise _LimitExceeded(f"asked for {left} ** {right} (limit {EXPONENT_BITS} bits)")
        return super().call_binop(context, operator, left, right)

    def call(self, context, obj, *args, **kwargs):
        _check_arguments(getattr(obj, "__name__", "a call"), (*args, *kwargs.values()))
        method = getattr(obj, "__wrapped__", obj)  # (the sandbox hands out str.format wrapped)
        if isinstance(getattr(method, "__self__", None), str) and method.__name__ in ("format", "format_map"):
            _check_widths(_BRACE_WIDTHS, method.__self__)
        return super().call(context, obj, *args, **kwargs)


def _checked(name, f):
    # (wraps keeps Jinja's mark on filters that take the environment or context)
    @functools.wraps(f)
    def filter_(*args, **kwargs):
        _check_arguments(f"filter {name}", (*args, *kwargs.values()))
        if name == "format" and args and isinstance(args[0], str):
            _check_widths(_PERCENT_WIDTHS, args[0])
        return f(*args, **kwargs)

    return filter_


def _check_arguments(what, values) -> None:
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > LARGEST_ARGUMENT:
            raise _LimitExceeded(f"gave {what} the number {v} (limit {LARGEST_ARGUMENT})")


# the widths and precisions of printf-style and str.format fields ("%1000000000d", "{:>1000000000}")
_PERCENT_WIDTHS = re.compile(r"%[-#0 +]*(\d*)(?:\.(\d*))?")
_BRACE_WIDTHS = re.compile(r"\{[^{}:]*:[^{}\d]*(\d*)(?:[,_]?\.(\d*))?")


def _check_widths(pattern: re.Pattern, text: str) -> None:
    for match in pattern.finditer(text):
        for digits in match.groups():
            if digits and int(digits) > LARGEST_ARGUMENT:
                raise _LimitExceeded(f"formats a field {digits} characters wide (limit {LARGEST_ARGUMENT})")


class _Limits:
    """A tracer for the rendering thread: counts the template's lines and checks time and memory."""

    def __init__(self):
        self.deadline = time.monotonic() + TIME_LIMIT
        self.start = _resident()

    def trace(self, frame, event, arg):
        # only the template's own code is traced line by line (Jinja compiles it as "<template>")
        return self.line if frame.f_code.co_filename == "<template>" else None

    def line(self, frame, event, arg):
        # every line: one line can double a string that a loop keeps doubling
        if self.start is not None and _resident() - self.start > MEMORY_LIMIT:
            raise _LimitExceeded(f"grew the process by more than {MEMORY_LIMIT >> 20} MB")
        if time.monotonic() > self.deadline:
            raise _LimitExceeded(f"ran for more than {TIME_LIMIT:g} s")
        return self.line


def _resident() -> int | None:
    """This process's resident bytes (Linux: one read of a file kept open); None without /proc."""
    global _statm
    try:
        if _statm is None or _statm[0] != os.getpid():  # (a forked process must read its own)
            _statm = (os.getpid(), os.open("/proc/self/statm", os.O_RDONLY))
        return int(os.pread(_statm[1], 128, 0).split()[1]) * _PAGE
    except OSError:
        return None


_statm: tuple[int, int] | None = None  # (pid, file descriptor)


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


def _raise(message):
    raise ValueError(message)
