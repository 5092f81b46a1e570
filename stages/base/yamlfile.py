"""Reading a YAML file a user wrote (params.yaml, a preset) within a budget, with duplicate keys refused.

PyYAML's safe loader builds an alias (`*name`) as a reference to the anchored object, so a 300-byte file of nested
aliases ("billion laughs") loads small but expands to billions of values for anything that walks it (a message,
json.dumps, a comparison). The file's size and the expanded value count are checked before anyone walks it. A key
written twice is an error naming the key and both lines (PyYAML keeps the last value silently, DVC refuses the
file: both ways of running must agree)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from stages.base.runtime import ParamsError, brief, shorten

MAX_FILE_BYTES = 1 << 20  # params.yaml is about 7 KB
MAX_VALUES = 100_000  # scalars, lists and mappings after aliases are expanded


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a mapping that repeats a key."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: the base class gives its own error
                break
            if first != line:
                raise ParamsError(f"{self.name}: key {brief(key)} is written twice (lines {first} and {line}); "
                                  "keep one")
        return super().construct_mapping(node, deep=deep)


def expanded_size(value: Any, limit: int = MAX_VALUES) -> int:
    """How many values `value` holds once every shared (aliased) list or mapping is counted each time it is used;
    stops counting past `limit`. Memoized by object, so it costs one visit per distinct object."""
    sizes: dict[int, int] = {}

    def size(item: Any) -> int:
        if not isinstance(item, (list, dict)):
            return 1
        if id(item) not in sizes:
            children = item.values() if isinstance(item, dict) else item
            total = 1
            for child in children:
                total += size(child)
                if total > limit:
                    break
            sizes[id(item)] = total
        return sizes[id(item)]

    return size(value)


def read_yaml(path: str | Path, what: str, shown_as: str | Path | None = None) -> Any:
    """The content of a YAML file; a ParamsError naming the file (as `shown_as`, if given) for a missing,
    oversized, invalid, duplicated-key or alias-bomb file."""
    path, name = Path(path), Path(shown_as or path)
    if not path.is_file():
        raise ParamsError(f"{name} not found: {what} (run from the repository root)")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ParamsError(f"{name}: {size:,} bytes; {what} is expected to be a small file of at most "
                          f"{MAX_FILE_BYTES:,} bytes")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ParamsError(f"{name}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    loader = _UniqueKeyLoader(text)
    loader.name = str(name)
    try:
        content = loader.get_single_data()
    except yaml.YAMLError as error:
        raise ParamsError(f"{name} is not valid YAML: {shorten(str(error), 400)}") from None
    finally:
        loader.dispose()
    if expanded_size(content) > MAX_VALUES:
        raise ParamsError(f"{name}: its aliases (*name) expand to more than {MAX_VALUES:,} values; write the values "
                          "out instead")
    return content
