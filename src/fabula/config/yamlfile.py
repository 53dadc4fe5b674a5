"""Reading fabula.yml: bytes -> text -> YAML, bounded (size, depth, numbers) and without what
makes a small file expensive or ambiguous (aliases, merge keys, duplicate keys)."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from fabula.config.values import MAX_CONFIG_BYTES, MAX_DEPTH, MAX_NUMBER_CHARS, cut, excerpt
from fabula.errors import ConfigError

# -- reading: bytes -> text -> YAML ----------------------------------------------------------------

class _Refused(yaml.MarkedYAMLError):
    pass


# what a tag's value must be, for the message that refuses one that is not
TAG_MEANINGS = {"int": "an integer", "float": "a number", "bool": "true or false", "null": "null",
                "timestamp": "a date or time (e.g. 2001-02-28, 2001-02-28 10:00:00)",
                "binary": "base64-encoded bytes"}


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader without what fabula.yml never needs and what makes a small file
    expensive or ambiguous: no anchors or aliases (a "billion laughs" file), no merge keys, no
    duplicate keys, no deep nesting, no numbers thousands of digits long."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(None, None, f"alias *{excerpt(event.anchor, 40)[1:-1]}: anchors and aliases are "
                           "not allowed in fabula.yml", event.start_mark)
        event = self.peek_event()
        if getattr(event, "anchor", None) is not None:
            raise _Refused(None, None, f"anchor &{excerpt(event.anchor, 40)[1:-1]}: anchors and aliases are "
                           "not allowed in fabula.yml", event.start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(None, None, f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if not isinstance(node, yaml.MappingNode):
            return super().construct_mapping(node, deep=deep)
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise _Refused("while reading a mapping", node.start_mark,
                               "merge keys (<<) are not allowed in fabula.yml", key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise _Refused("while reading a mapping", node.start_mark,
                               "a key must be a plain value, not a list or mapping", key_node.start_mark) from None
            if key in seen:
                raise _Refused("while reading a mapping", node.start_mark,
                               f"duplicate key {excerpt(key, 40)} (first at line {seen[key].line + 1}): "
                               "each key may appear once", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node, deep=False):
        """PyYAML's constructors raise plain Python errors for a scalar they cannot read (a 30th of
        February, `!!int ""`, `!!bool maybe`, `!!timestamp foo`): refused here, at the value's place."""
        try:
            return super().construct_object(node, deep=deep)
        except (yaml.YAMLError, RecursionError, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - whatever a constructor raises for a bad value
            tag = node.tag.removeprefix("tag:yaml.org,2002:")
            what = TAG_MEANINGS.get(tag, f"a value of tag {node.tag}")
            value = excerpt(node.value, 40) if isinstance(node, yaml.ScalarNode) else f"this {node.id}"
            reason = cut(str(exc), 80) if isinstance(exc, ValueError) else ""
            raise _Refused(None, None, f"{value} is not {cut(what, 80)}" + (f" ({reason})" if reason else ""),
                           node.start_mark) from None

    def _short_number(self, node):
        if len(node.value) > MAX_NUMBER_CHARS:
            raise _Refused(None, None, f"a number of {len(node.value)} characters", node.start_mark)

    def construct_yaml_int(self, node):
        self._short_number(node)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node):
        self._short_number(node)
        return super().construct_yaml_float(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)


NO_FILE_HINT = "run fabula in the folder holding fabula.yml, or pass -c PATH"


def read_regular_file(path: Path, limit: int, what: str, shown: str, hint: str) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `limit` bytes: never blocks on
    a FIFO or device, never reads without end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise ConfigError(f"{shown}: no such file", hint) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        if getattr(exc, "errno", None) == errno.EISDIR:
            reason = f"is a directory, not {what}"
        raise ConfigError(f"{shown}: cannot read {what}: {reason}", hint) from None
    try:
        return read_open_file(fd, limit, what, shown, hint)
    finally:
        os.close(fd)


def read_open_file(fd: int, limit: int, what: str, shown: str, hint: str) -> bytes:
    """The bytes of the file open as `fd` (opened non-blocking), which must be a regular file of at
    most `limit` bytes."""
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"{shown}: is a directory, not {what}", hint)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{shown}: is not a regular file (a FIFO, socket or device), not {what}", hint)
        if info.st_size > limit:
            raise ConfigError(f"{shown}: {info.st_size} bytes is too large for {what} (at most {limit})", hint)
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise ConfigError(f"{shown}: too large for {what} (more than {limit} bytes)", hint)
        return b"".join(chunks)
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read {what}: {exc.strerror or exc}", hint) from None


def parse_file(path: Path, shown: str) -> Any:
    data = read_regular_file(path, MAX_CONFIG_BYTES, "a fabula.yml", shown, NO_FILE_HINT)
    fix = f"save {shown} as UTF-8 text"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"{shown}: is UTF-16 text; fabula.yml must be UTF-8", fix)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{shown}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start}); fabula.yml must be UTF-8", fix) from None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise ConfigError(f"{shown}: line {line}: holds a NUL byte; fabula.yml is text", fix)
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{shown}:{where}: invalid YAML: {cut(str(problem), 200)}",
                          f"correct {shown}{' at' + where if where else ''}") from None
    except RecursionError:
        raise ConfigError(f"{shown}: invalid YAML: nested too deeply",
                          f"fabula.yml nests a few levels; correct {shown}") from None


