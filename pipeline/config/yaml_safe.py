"""A bounded YAML reader for configs: size, alias expansion and depth are capped, keys unique.

``yaml.safe_load`` runs no code, but a few hundred bytes of nested aliases ("billion laughs")
expand to millions of values, and a repeated key silently keeps its last value. Configs are
small, so this reader refuses a file over :data:`MAX_BYTES`, a document that would expand to
more than :data:`MAX_NODES` values or nest deeper than :data:`MAX_DEPTH`, and a mapping that
repeats a key, each with a :class:`~pipeline.config.typed.ConfigError` naming the problem.
"""

from __future__ import annotations

import os
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from pipeline.config.typed import ConfigError

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "load_yaml", "load_yaml_text"]

MAX_BYTES = 1 << 20  # 1 MiB: a config is a few hundred bytes
MAX_NODES = 100_000  # values after alias expansion
MAX_DEPTH = 64  # nesting of mappings and lists


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with a repeated key."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: SafeLoader reports it
                break
            if duplicate:
                mark = key_node.start_mark
                raise ConfigError(
                    str(key), f"duplicate key at line {mark.line + 1}; each key may appear once"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: Node, depth: int, memo: dict[int, int]) -> int:
    """Values ``node`` stands for once every alias is expanded (aliases share node objects)."""
    if depth > MAX_DEPTH:
        raise ConfigError("", f"config nests deeper than {MAX_DEPTH} levels")
    known = memo.get(id(node))
    if known is not None:
        return known
    size = 1
    if isinstance(node, SequenceNode):
        children: list[Node] = list(node.value)
    elif isinstance(node, MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    for child in children:
        size += _expanded_size(child, depth + 1, memo)
        if size > MAX_NODES:
            raise ConfigError(
                "", f"config expands to more than {MAX_NODES} values (aliases); refusing it"
            )
    memo[id(node)] = size
    return size


def load_yaml_text(text: str, where: str = "config") -> Any:
    """Parse one YAML document with the bounds above.

    Raises:
        ConfigError: too large, too deep, too many values after aliases, a duplicate key, or
            not valid YAML; the message names ``where``.
    """
    if len(text.encode("utf-8", errors="replace")) > MAX_BYTES:
        raise ConfigError("", f"{where} is larger than {MAX_BYTES} bytes")
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()  # type: ignore[no-untyped-call]
        if node is None:
            return None
        _expanded_size(node, 0, {})
        return loader.construct_document(node)  # type: ignore[no-untyped-call]
    except yaml.YAMLError as e:
        raise ConfigError("", f"{where} is not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError("", f"{where} nests too deeply") from None
    finally:
        loader.dispose()  # type: ignore[no-untyped-call]


def load_yaml(path: str | os.PathLike[str]) -> Any:
    """Read and parse a YAML file with the bounds of :func:`load_yaml_text`.

    Raises:
        ConfigError: unreadable, too large, or refused as above.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        if size > MAX_BYTES:
            raise ConfigError("", f"config file {path!r} is {size} bytes; the limit is {MAX_BYTES}")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("", f"cannot read config file {path!r}: {e}") from None
    return load_yaml_text(text, where=f"config file {path!r}")
