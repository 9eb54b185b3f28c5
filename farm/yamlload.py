"""YAML as farm reads it: safe, and a key given twice in one mapping is an error, not "last wins".

PyYAML's ``safe_load`` keeps the last of two equal keys silently, so a topology with ``nodes:``
twice describes a farm nobody wrote. OmegaConf (and so Hydra's conf/ files) already refuses
duplicates; this loader gives farm's own YAML reads the same rule, with both lines in the message.
"""

from __future__ import annotations

from typing import Any

import yaml

_MERGE = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.YAMLError):
    """A mapping holds the same key twice."""


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    seen = first.get(key)
                except TypeError:  # an unhashable key: SafeLoader reports it itself
                    continue
                if seen is not None:
                    raise DuplicateKeyError(
                        f"{key_node.start_mark.name}: key {key!r} appears twice in one mapping, at line "
                        f"{seen} and at line {line}; keep one of them"
                    )
                first[key] = line
        return super().construct_mapping(node, deep=deep)  # type: ignore[arg-type]


def load_yaml(text: str, *, source: str = "<yaml>") -> Any:
    """Parse ``text`` (named ``source`` in messages) safely, refusing duplicate keys."""
    loader = _StrictLoader(text)
    loader.name = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
