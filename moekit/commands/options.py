"""Options from pydantic models, for every command: flags generated from the fields, `--config FILE.yaml`,
and one usage error (exit 2) for values the model refuses.

    @model_options(BuildOptions)       one flag per field: `--gate-batch-size`, `--overwrite/--no-overwrite`, ...
    @config_option                     `--config FILE.yaml`: any option of the command, by its field or flag name
    parse_options(BuildOptions, values) -> BuildOptions, or click.UsageError naming the option

Flags default to None, so the model's defaults stay the single source; `parse_options` passes on only the
values that were given (on the command line or in the config file). As in TRL's `TrlParser`, the config file
supplies values and explicit flags override them: its values become click's `default_map`, so they go through
the same types, choices and checks as the flags.

Field types become flags this way: Literal -> a choice, bool -> `--x/--no-x`, list[str] -> a repeatable flag,
dict[str, str] -> a repeatable NAME=VALUE flag, other lists -> one comma list (LIST) that the model's validator
splits, int/float/str -> themselves.
"""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Literal, TypeVar, Union, get_args, get_origin

import click
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)
CONFIG_KEY = "moekit.config"  # ctx.meta: the --config file, for messages about the values it gave


def model_options(model: type[BaseModel], *, flags: dict[str, str] | None = None, metavars: dict[str, str] | None = None):
    """Decorator adding one click option per field of `model`, named after the field (`lora_r` -> `--lora-r`)
    unless `flags` spells it otherwise (`{"tasks": "--task"}`); `metavars` names a field's value in --help."""
    flags, metavars = flags or {}, metavars or {}

    def decorate(func):
        parsed_by_model = _parsed_by_model(model)
        for name, field in reversed(list(model.model_fields.items())):
            func = _option(name, field, flags.get(name, "--" + name.replace("_", "-")), metavars.get(name), name in parsed_by_model)(func)
        return func

    return decorate


def _parsed_by_model(model: type[BaseModel]) -> set[str]:
    """Fields with a `mode="before"` validator: the model parses their text ('2GB', '0-3'), so the flag passes it on."""
    validators = model.__pydantic_decorators__.field_validators.values()
    return {name for validator in validators if validator.info.mode == "before" for name in validator.info.fields}


def _option(name: str, field, flag: str, metavar: str | None, parsed_by_model: bool):
    annotation = _without_none(field.annotation)
    origin, args = get_origin(annotation), get_args(annotation)
    default = None if field.is_required() else field.get_default(call_default_factory=True)
    help_text = field.description or ""
    if annotation is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text + f" [default: {'on' if default else 'off'}]")
    if default not in (None, [], {}) and "[default:" not in help_text:
        help_text += f" [default: {','.join(map(str, default)) if isinstance(default, list) else default}]"
    if origin is Literal and all(isinstance(a, int) for a in args):  # `--bits 4`: a choice of numbers, given to the model as an int
        return click.option(
            flag, name, type=click.Choice([str(a) for a in args]), default=None, help=help_text, callback=lambda _c, _p, v: None if v is None else int(v)
        )
    if origin is Literal:
        return click.option(flag, name, type=click.Choice([str(a) for a in args]), default=None, help=help_text)
    if origin is dict:
        return click.option(flag, name, multiple=True, metavar=metavar or "NAME=VALUE", help=help_text, callback=_name_value_pairs)
    if origin is list and args == (str,):
        return click.option(flag, name, multiple=True, metavar=metavar, help=help_text)
    if origin is list:
        return click.option(flag, name, type=str, default=None, metavar=metavar or "LIST", help=help_text)
    click_type = annotation if annotation in (int, float) and not parsed_by_model else str
    return click.option(flag, name, type=click_type, default=None, metavar=metavar, help=help_text)


def _without_none(annotation):
    """`int | None` -> int."""
    args = get_args(annotation)
    if get_origin(annotation) in (Union, UnionType) and type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return annotation


def _name_value_pairs(_ctx, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str] | None:
    """('code=a.jsonl', 'prose=b.txt') -> {'code': 'a.jsonl', 'prose': 'b.txt'}; () -> None (not given)."""
    pairs: dict[str, str] = {}
    for value in values:
        name, sep, spec = value.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise click.BadParameter(f"expected {param.metavar}, got {value!r}", param=param)
        if name.strip() in pairs:
            raise click.BadParameter(f"{name.strip()!r} is given twice", param=param)
        pairs[name.strip()] = spec.strip()
    return pairs or None


def parse_options(model: type[Model], values: dict) -> Model:
    """`model` from a command's click values: the fields given on the command line or in --config, the model's
    defaults for the rest. A value the model refuses is a usage error (exit 2) naming its flag or config key."""
    given = {key: value for key, value in values.items() if key in model.model_fields and value is not None and value != ()}
    try:
        return model(**given)
    except ValidationError as err:
        first = err.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else None
        where = _where(name)
        if first["type"] == "missing":
            raise click.UsageError(f"missing option {where}") from None
        raise click.UsageError(f"invalid {where}: {first['msg'].removeprefix('Value error, ')}") from None


def _where(name: str | None) -> str:
    """How the user gave the option `name`: '--lora-r', or 'lora_r in FILE.yaml' for a value from --config."""
    if name is None:
        return "options"
    ctx = click.get_current_context(silent=True)
    param = next((p for p in ctx.command.params if p.name == name), None) if ctx else None
    if param is None:
        return "--" + name.replace("_", "-")
    if ctx.get_parameter_source(name) == click.core.ParameterSource.DEFAULT_MAP and CONFIG_KEY in ctx.meta:
        return f"{name} in {ctx.meta[CONFIG_KEY]}"
    return max(param.opts, key=len)


def config_option(func):
    """Decorator adding `--config FILE.yaml` to a command: a YAML mapping from option names (as the fields or as the
    flags: `lora_r`, `lora-r`, `task`) to values; lists and mappings are written as YAML lists and mappings."""
    return click.option(
        "--config",
        type=click.Path(path_type=Path, dir_okay=False),
        metavar="FILE.yaml",
        default=None,
        is_eager=True,
        expose_value=False,
        callback=_read_config,
        help="YAML file mapping option names (as above; dashes or underscores) to values; options given on the command line override it.",
    )(func)


def _read_config(ctx: click.Context, param: click.Parameter, path: Path | None) -> Path | None:
    if path is None:
        return None
    import yaml

    from moekit.errors import did_you_mean

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise click.BadParameter(f"cannot read {path}: {err.strerror or err}", ctx, param) from None
    except yaml.YAMLError as err:
        raise click.BadParameter(f"{path} is not valid YAML: {str(err).splitlines()[0]}", ctx, param) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} must be a mapping of option names to values, not a {type(data).__name__}", ctx, param)
    options = _config_names(ctx.command)
    default_map = dict(ctx.default_map or {})
    for key, value in data.items():
        option = options.get(str(key).replace("-", "_"))
        if option is None:
            close = did_you_mean(str(key).replace("-", "_"), options)
            known = close or f" (options: {', '.join(sorted({_config_name(o) for o in options.values()}))})"
            raise click.BadParameter(f"{path}: unknown option {key!r}{known}", ctx, param)
        if value is None:  # `teacher:` with nothing after it: the option's default
            continue
        if option.is_flag and not option.is_bool_flag:  # `fsdp: true` for the --fsdp of --fsdp/--ddp
            if not isinstance(value, bool):
                raise click.BadParameter(f"{path}: {key} must be true or false, got {value!r}", ctx, param)
            if value:
                default_map[option.name] = option.flag_value
            continue
        value = _cli_value(option, value)
        try:
            option.type_cast_value(ctx, value)  # checked here too, so that the message names the file
        except click.BadParameter as err:
            raise click.BadParameter(f"{path}: {key}: {err.message}", ctx, param) from None
        default_map[option.name] = value
    ctx.default_map = default_map
    ctx.meta[CONFIG_KEY] = path
    return path


def _config_names(command: click.Command) -> dict[str, click.Option]:
    """Every option of `command` but --config and --help, by its name and by its long flag, dashes as underscores."""
    names: dict[str, click.Option] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name in ("config", "help"):
            continue
        long_flags = [opt[2:].replace("-", "_") for opt in param.opts if opt.startswith("--")]
        for name in long_flags if param.is_flag and not param.is_bool_flag else [param.name, *long_flags]:
            names[name] = param
    return names


def _config_name(option: click.Option) -> str:
    """The name --config lists for an option: its long flag with underscores (`json` for --json, `task` for --task)."""
    return next(opt for opt in option.opts if opt.startswith("--"))[2:].replace("-", "_")


def _cli_value(option: click.Option, value):
    """A YAML value as the command line would give it: a list for a repeatable option (NAME=VALUE pairs from a
    mapping), a comma list for a LIST option."""
    if option.multiple:
        if isinstance(value, dict):
            return [f"{name}={spec}" for name, spec in value.items()]
        return list(value) if isinstance(value, list) else [value]
    if isinstance(value, list):
        return ",".join(map(str, value))
    return value
