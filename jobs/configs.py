"""Training configs as data: the bundled YAML files in `configs/` and `a.b=value` overrides.

Both sides of the queue read configs through here: the service checks them against
`configs/schema.json` (jobs.validate) without importing the trainer, the trainer validates
them with pydantic (trainer.config). A config and its overrides therefore mean the same
thing on both sides.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SCHEMA = CONFIG_DIR / "schema.json"

Overrides = Sequence[str] | Mapping[str, Any]


class ConfigError(ValueError):
    """A config that cannot be trained; `errors` name the field of each problem."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("; ".join(errors))


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def config_data(source: str | Path | Mapping[str, Any], overrides: Overrides = ()) -> dict[str, Any]:
    """The config data of a YAML path, a bundled config's name (e.g. 'rng') or a mapping,
    with overrides: `["a.b=value"]` (values read as YAML) or `{"a.b": value}`. A relative data
    path in a YAML file is the file's neighbour (the config and its data travel together); one in
    an override is read from the current directory, as any path on a command line."""
    path = None if isinstance(source, Mapping) else _resolve(source)
    data = source if path is None else _read(path)
    if not isinstance(data, Mapping):
        raise ConfigError([f"config: {source} is not a mapping of settings"])
    data = copy.deepcopy(dict(data))
    if path is not None:
        rebase_data_paths(data, path.parent)
    pairs = overrides.items() if isinstance(overrides, Mapping) else map(_parse, overrides)
    for key, value in pairs:
        _set(data, key.split("."), value)
    return data


class _BadKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML without duplicate keys: PyYAML keeps the last silently (`name: rng` then `name: other`
    would train `other`). A list or mapping as a key (`? [a]`) is refused too: no setting has one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, Hashable):
                raise _BadKey(f"the key on line {line} is a {type(key).__name__}, not a name")
            if key in seen:
                raise _BadKey(f"key {key!r} appears twice (lines {seen[key]} and {line})")
            seen[key] = line
        return super().construct_mapping(node, deep)


# Numbers as YAML 1.2 and every ML config read them: YAML 1.1 reads 1e-3 (no dot) as a string, `010`
# as 8 and `1:30` as 90 (base 60), the last two silently. Integers are decimal; floats have a dot or
# an exponent.
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver(_INT, re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_UniqueKeyLoader.add_implicit_resolver(_FLOAT, re.compile(
    r"^[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(?=[eE]))(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))
_UniqueKeyLoader.add_constructor(_INT, lambda loader, node: int(loader.construct_scalar(node)))


def _load_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None


def _read(path: Path) -> Any:
    try:
        return _load_yaml(path.read_text()) or {}
    except _BadKey as error:
        raise ConfigError([f"config: {path}: {error}"]) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError([f"config: {path} is not a readable YAML file ({' '.join(str(error).split())})"]) from None


def _parse(override: str) -> tuple[str, Any]:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError([f"override {override!r} is not of the form key.path=value"])
    if not value.strip():  # an unset shell variable ($DATA): YAML reads null, the default, silently
        raise ConfigError([f"{key}: no value after '=' (write {key}=null to set it to nothing)"])
    try:
        return key, _load_yaml(value)
    except yaml.YAMLError as error:
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise ConfigError([f"{key}: {shown!r} is not a YAML value ({' '.join(str(error).split())})"]) from None


def _resolve(source: str | Path) -> Path:
    path = Path(source)
    if path.exists():
        return path
    bundled = CONFIG_DIR / f"{source}.yaml"
    if bundled.exists():
        return bundled
    raise ConfigError([f"config: no config file {source} (bundled configs: {', '.join(bundled_configs())})"])


DATA_KEYS = ("data", "eval_data")
"""The task settings that name a user's data file."""


def relative_data_paths(data: Mapping[str, Any]) -> list[str]:
    """The task.data / task.eval_data settings given as relative paths: a queued job would read
    them from its worker's directory, not the submitter's."""
    task = data.get("task")
    return [f"task.{key}" for key in DATA_KEYS if isinstance(task, Mapping) and isinstance(task.get(key), str)
            and not Path(task[key]).is_absolute()]


def rebase_data_paths(data: dict[str, Any], directory: Path) -> None:
    """Makes each relative task.data / task.eval_data of `data` a path in `directory`."""
    for key in relative_data_paths(data):
        field = key.partition(".")[2]
        data["task"][field] = str(directory / data["task"][field])


MAX_DEPTH = 8  # no config nests deeper; a longer key is a mistake (or an attack on the JSON encoder)


def _set(data: dict[str, Any], keys: list[str], value: Any) -> None:
    if len(keys) > MAX_DEPTH:
        raise ConfigError([f"{'.'.join(keys)[:80]}: no setting is nested {len(keys)} deep"])
    for key in keys[:-1]:
        node = data.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError([f"{'.'.join(keys)}: cannot be set, {key} is not a section"])
        data = node
    data[keys[-1]] = value
