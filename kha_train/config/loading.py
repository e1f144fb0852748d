"""Loading a run config: YAML files chained by ``extends``, command-line ``key=value``
overrides and the exclusive keys, merged over the schema defaults by OmegaConf into a typed
:class:`Config`; and writing one back as YAML."""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from kha_train.config.errors import ConfigError
from kha_train.config.schema import Config

# omegaconf is imported lazily inside the loaders so `import kha_train.config` stays cheap and
# works where omegaconf is not installed (e.g. the GPU image, which builds configs directly).

EXTENDS_KEY = "extends"


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML file, merging it over the chain of files it ``extends``."""
    from omegaconf import OmegaConf

    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"config files extend each other in a loop: {chain}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:  # yaml syntax errors
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}"
        )
    base_name = raw.pop(EXTENDS_KEY, None)
    if base_name is None:
        return raw
    base = _read_yaml(path.parent / str(base_name), (*seen, path))
    merged = _deep_merge(base, _replace_exclusive(base, raw, str(path), []))
    for cleared in _cleared_mappings(raw, Config):  # {} replaces the parent's mapping
        *sections, key = cleared.split(".")
        node = merged
        for section in sections:
            node = node[section]
        node[key] = {}
    return merged


# Keys of which a config sets exactly one (the run's length). A layer (a file that extends
# another, or the command line) that sets one of them replaces the other: `train.max_steps=20`
# on a config with train.total_tokens just works.
EXCLUSIVE_KEYS = (("train", "max_steps", "total_tokens"),)


def _replace_exclusive(
    base: dict[str, Any], over: dict[str, Any], source: str, notes: list[str]
) -> dict[str, Any]:
    """``over`` with the other key of each exclusive pair set to null where ``over`` sets one
    key of it and ``base`` the other; ``notes`` gets one line per replacement."""
    out = dict(over)
    for section, *keys in EXCLUSIVE_KEYS:
        mine, theirs = over.get(section), base.get(section)
        if not isinstance(mine, dict) or not isinstance(theirs, dict):
            continue
        for key in keys:
            others = [k for k in keys if k != key]
            if mine.get(key) is None or any(k in mine for k in others):
                continue
            for other in others:
                if theirs.get(other) is not None:
                    notes.append(
                        f"{section}.{key}={mine[key]} ({source}) replaces "
                        f"{section}.{other}={theirs[other]}"
                    )
                    out[section] = {**out[section], other: None}
    return out


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _check_keys(node: Any, schema: type, prefix: str, source: str) -> None:
    """Reject unknown keys anywhere in ``node`` with the full path and close matches."""
    if not isinstance(node, dict):
        return
    by_name = {f.name: f for f in fields(schema)}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if key not in by_name:
            close = difflib.get_close_matches(str(key), list(by_name), n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(repr(prefix + c) for c in close)}?" if close else ""
            valid = ", ".join(sorted(by_name))
            raise ConfigError(f"{source}: unknown key '{path}'.{hint} Valid keys here: {valid}.")
        sub = _dataclass_type(by_name[key].type, schema)
        if sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{source}: '{path}' is a section and needs a mapping of keys, got {value!r}."
                )
            _check_keys(value, sub, path + ".", source)


def _dataclass_type(annotation: Any, owner: type) -> type | None:
    """The dataclass a field holds, if any (annotations are strings under `from __future__`,
    resolved in the module that defines ``owner``)."""
    if isinstance(annotation, str):
        annotation = vars(sys.modules[owner.__module__]).get(annotation, None)
    return annotation if isinstance(annotation, type) and is_dataclass(annotation) else None


def _cleared_mappings(node: Any, schema: type, prefix: str = "") -> list[str]:
    """Paths where ``node`` gives ``{}`` to a free-form mapping field (eval.sets): an empty
    mapping clears what earlier layers set there, where a merge would keep it."""
    if not isinstance(node, dict):
        return []
    out = []
    for f in fields(schema):
        value = node.get(f.name)
        sub = _dataclass_type(f.type, schema)
        if sub is not None:
            out += _cleared_mappings(value, sub, f"{prefix}{f.name}.")
        elif value == {} and str(f.type).startswith("dict"):
            out.append(prefix + f.name)
    return out


def _overrides_to_dict(overrides: list[str]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    for o in overrides:
        if "=" not in o:
            raise ConfigError(
                f"command-line override {o!r} is not key=value (e.g. optim.lr=3e-4 or train.max_steps=100)"
            )
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=False)  # type: ignore[return-value]
    except Exception as e:
        raise ConfigError(f"could not parse command-line overrides {overrides}: {e}") from e


def _format_omegaconf_error(e: Exception, source: str) -> str:
    key = getattr(e, "full_key", None) or ""
    msg = (getattr(e, "msg", None) or str(e)).splitlines()[0]
    where = f" at '{key}'" if key else ""
    return f"{source}: invalid value{where}: {msg}"


def build_config(layers: list[tuple[str, dict[str, Any]]]) -> Config:
    """Merge (source name, mapping) layers over the schema defaults into a typed :class:`Config`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.structured(Config)
    for source, layer in layers:
        _check_keys(layer, Config, "", source)
        try:
            merged = OmegaConf.merge(merged, layer)
            for path in _cleared_mappings(layer, Config):  # a merge would keep the old keys
                OmegaConf.update(merged, path, {}, merge=False)
        except OmegaConfBaseException as e:
            raise ConfigError(_format_omegaconf_error(e, source)) from e
    missing = sorted(_missing_keys(merged))
    if missing:
        raise ConfigError(
            f"required value(s) missing: {', '.join(missing)}. Set them in the YAML file or on the "
            f"command line, e.g. {missing[0]}=..."
        )
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_format_omegaconf_error(e, "config")) from e
    assert isinstance(cfg, Config)
    return cfg


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig, OmegaConf

    out = []
    for key in node:
        path = f"{prefix}{key}"
        if OmegaConf.is_missing(node, key):
            out.append(path)
        elif isinstance(node[key], DictConfig):
            out.extend(_missing_keys(node[key], path + "."))
    return out


def load_config(
    path: str | os.PathLike[str],
    overrides: list[str] | None = None,
    notes: list[str] | None = None,
) -> Config:
    """Load a YAML config (following ``extends``), apply ``key=value`` overrides, check types.

    An override of one of a pair of exclusive keys (:data:`EXCLUSIVE_KEYS`) replaces the other;
    each such replacement is appended to ``notes`` (or, without a list, printed to stderr by
    rank 0 as a ``note:`` line)."""
    layers = [(str(path), _read_yaml(Path(path)))]
    replaced: list[str] = []
    if overrides:
        cli = _overrides_to_dict(list(overrides))
        layers.append(
            ("command line", _replace_exclusive(layers[0][1], cli, "command line", replaced))
        )
    if notes is not None:
        notes.extend(replaced)
    elif replaced and os.environ.get("RANK", "0") == "0":
        for line in replaced:
            print(f"note: {line}", file=sys.stderr)
    return build_config(layers)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (saved with every run; loadable by :func:`load_config`)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)


def to_dict(cfg: Config) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)  # type: ignore[return-value]


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)
