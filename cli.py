"""A config dataclass as command-line flags: every field a `--flag`, its comment in the class its --help.

    cfg = cli.parse(SomeConfig, argv, description=__doc__)   # a dataclass: each field a flag

`int | None` fields parse as int and stay None when not given (the scripts read None as "the
recipe's value"); bool fields get --flag / --no-flag. `section(cfg, Kind)` takes the fields one module reads. `exit_status` is the scripts' one way of
turning a user's error into one line and exit status 2.
"""

import argparse
import dataclasses
import inspect
import re
import sys
import typing

from errors import CaptchaError


def field_comments(cls):
    """Each field's comment in the class's source (a field's line and the comment lines aligned under it)."""
    comments, name = {}, None
    for line in inspect.getsource(cls).splitlines():
        field = re.match(r"\s+(\w+): [\w |]+ = [^#]*(?:#\s*(.*))?$", line)
        if field:
            name = field.group(1)
            comments[name] = field.group(2) or ""
        elif name and re.match(r"\s+#\s{5,}\S", line):  # a comment line aligned under the field's own
            comments[name] += " " + line.strip().lstrip("#").strip()
        else:
            name = None
    return comments


def parse(cls, argv=None, description=None):
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        help_text = f"{comments.get(f.name, '')} (default: {f.default!r})".strip().replace("%", "%%")
        if f.type is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            kind = next((k for k in typing.get_args(f.type) if k is not type(None)), f.type)
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=help_text)
    return cls(**vars(parser.parse_args(argv)))


def section(config, kind):
    """The part of a flat command-line `config` that one module reads: the fields of `kind` (a dataclass that module
    declares, each field named as its flag), taken from `config` by name. train.py hands each module its own."""
    return kind(**{f.name: getattr(config, f.name) for f in dataclasses.fields(kind)})


def restored(cls, saved, **overrides):
    """A config of class `cls` from the settings a run saved (its resume checkpoint, a self-training state), with
    `overrides`; settings an older release saved that `cls` no longer has are dropped."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{name: value for name, value in saved.items() if name in names}, **overrides})


def user_error(problem):
    """The one way a script refuses: `error: PROBLEM` as one line on stderr; returns the exit status, 2."""
    print(f"error: {problem}", file=sys.stderr)
    return 2


def exit_status(action, *user_errors):
    """Runs `action()`: 0, or 2 with one `error: ...` line on stderr for a CaptchaError or one of `user_errors`
    (bad input is a line naming the file and the problem, never a traceback)."""
    try:
        action()
    except (CaptchaError, *user_errors) as e:
        return user_error(e)
    return 0
