"""Reading a cluster spec file: bounded UTF-8 text, a strict YAML loader (no duplicate keys, no deep
nesting, a bad tagged value an error at its line), and validation errors as one line per problem,
each naming the file and the key (the contract for bad input)."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from spotrain.config import ClusterSpec
from spotrain.errors import SpecError
from spotrain.textfiles import UnreadableText, read_user_text

MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_DEPTH = 32  # a real spec nests 5 deep; far deeper is an attack on the parser's recursion
MAX_ERROR_LINES = 10


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _printable(line: str) -> str:
    """`line` with its control characters and line breaks escaped: one error, one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)


def _error_lines(path: Path, error: ValidationError) -> list[str]:
    """One line per problem, each naming the file and the key; the first MAX_ERROR_LINES of them."""
    lines = []
    problems = error.errors()
    for problem in problems[:MAX_ERROR_LINES]:
        key = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        elif "input" in problem and not isinstance(problem["input"], (dict, list)):
            message = f"{message} (got {_shown(problem['input'])})"
        lines.append(_printable(f"{path}: {key}: {message}" if key else f"{path}: {message}"))
    if len(problems) > MAX_ERROR_LINES:
        lines.append(f"{path}: and {len(problems) - MAX_ERROR_LINES} more errors")
    return lines


def parse_spec(data: object, path: Path, import_task: bool = True) -> ClusterSpec:
    """Validate a spec read from `path`: `training.code_dir` is resolved against its folder, and the
    task is imported (from there) unless `import_task` is False."""
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the spec must be a YAML mapping")
    try:
        return ClusterSpec.model_validate(data, context={"spec_dir": path.parent, "import_task": import_task})
    except ValidationError as error:
        raise SpecError("\n".join(_error_lines(path, error))) from None


def stored_spec(data: dict) -> ClusterSpec:
    """A spec as the ledger keeps it (its code_dir already absolute), read without importing the task:
    `down`, `status`, `report`, `logs` and `export` must work when the user's code is gone."""
    try:
        return ClusterSpec.model_validate(data, context={"import_task": False})
    except ValidationError as error:
        raise SpecError("\n".join(_error_lines(Path("stored spec"), error))) from None


class _SpecYamlError(yaml.MarkedYAMLError):
    """A spec that is valid YAML but not a usable document: a key given twice, nesting too deep."""


class _SpecLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, stricter: duplicate keys and deep nesting are errors, and a value its
    tag cannot hold (`!!int abc`, `2001-02-30`) is an error at its line, not a ValueError."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        self._depth += 1  # composing recurses once per level: stop before Python's recursion limit
        try:
            if self._depth > MAX_SPEC_DEPTH:
                raise _SpecYamlError(problem=f"nested deeper than {MAX_SPEC_DEPTH} levels",
                                     problem_mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> object:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, OverflowError) as error:
            raise _SpecYamlError(problem=f"bad value {_shown(node.value)}: {error}",
                                 problem_mark=node.start_mark) from None
        except IndexError:  # PyYAML's int and float constructors on an empty scalar tagged `!!int`/`!!float`
            raise _SpecYamlError(problem=f"bad value {_shown(node.value)} for !!{str(node.tag).rpartition(':')[2]}",
                                 problem_mark=node.start_mark) from None

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first_line: dict[object, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *defaults` may be overridden by the keys beside it
                key = self.construct_object(key_node)
                try:
                    duplicate = key in first_line
                except TypeError:
                    continue  # an unhashable key: yaml itself says so
                if duplicate:
                    raise _SpecYamlError(problem=f"duplicate key {_shown(key)} "
                                                 f"(first given at line {first_line[key]})",
                                         problem_mark=key_node.start_mark)
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _yaml_error_line(path: Path, text: str, error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    if isinstance(error, yaml.reader.ReaderError):  # a character YAML does not allow
        where = f"line {text.count(chr(10), 0, error.position) + 1}: "
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    kind = "" if isinstance(error, _SpecYamlError) else "YAML syntax error: "
    return _printable(f"{path}: {where}{kind}{problem}")


def load_spec(path: str | Path) -> ClusterSpec:
    path = Path(path)
    try:
        text = read_user_text(path, MAX_SPEC_BYTES)
    except UnreadableText as error:
        raise SpecError(f"{path}: {error}") from None
    try:
        data = yaml.load(text, Loader=_SpecLoader)
    except yaml.YAMLError as error:
        raise SpecError(_yaml_error_line(path, text, error)) from None
    return parse_spec(data, path)
