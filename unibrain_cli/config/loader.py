"""Strict TOML recipes <-> frozen dataclasses, and ``--set a.b=c`` overrides.

Loading is strict: an unknown key or a value of the wrong type is a :class:`UserError`
naming the dotted path (``model.llm.hidden_size``) and the file.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from unibrain_cli.config.components import DRAFT_VIEWS, STAGE_ORDER, Recipe
from unibrain_cli.config.validate import validate_model_config
from unibrain_cli.errors import UserError
from unibrain_cli.io.atomic import write_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = typing.TypeVar("T")

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


class RecipeError(UserError):
    """A recipe problem: names the dotted key and the file."""


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, source: str) -> Any:
    """Check ``value`` against type ``tp`` and convert (lists -> tuples, tables -> dataclasses)."""

    def fail(expected: str) -> typing.NoReturn:
        raise RecipeError(
            f"'{path}' must be {expected}, got {type(value).__name__} {value!r}", source
        )

    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail(f"a table for {tp.__name__}")
        return _build(tp, value, path, source)
    if origin is Literal:
        if value not in get_args(tp):
            fail("one of " + ", ".join(repr(a) for a in get_args(tp)))
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return _convert(value, arg, path, source)
            except RecipeError as exc:
                errors.append(exc)
        fail(" or ".join(_type_name(a) for a in get_args(tp)))
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            fail("an array")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            fail(f"an array of {len(args)} items")
        return tuple(_convert(v, a, f"{path}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a bug in the dataclasses


def _build(cls: type, table: dict[str, Any], prefix: str, source: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise RecipeError(
                f"unknown key '{path}'; valid keys here: {', '.join(sorted(names))}", source
            )
        kwargs[key] = _convert(value, hints[key], path, source)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise RecipeError(f"{prefix or 'recipe'}: {exc}", source) from exc


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) of a recipe."""
    return _to_plain(recipe)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def dumps_toml(data: dict[str, Any]) -> str:
    """Serialise a nested dict of tables / arrays of tables / scalars to TOML."""
    lines: list[str] = []

    def emit(table: dict[str, Any], prefix: str) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)
                   and not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))}
        for k, v in scalars.items():
            lines.append(f"{k} = {_toml_value(v)}")
        for k, v in table.items():
            if isinstance(v, dict):
                lines.append("")
                lines.append(f"[{prefix}{k}]")
                emit(v, f"{prefix}{k}.")
        for k, v in table.items():
            if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                for item in v:
                    lines.append("")
                    lines.append(f"[[{prefix}{k}]]")
                    emit(item, f"{prefix}{k}.")

    emit(data, "")
    return "\n".join(lines).strip() + "\n"


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise RecipeError(f"'{item}' is not KEY=VALUE (e.g. --set train.seed=3)", "--set")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"'{item}' has an empty key", "--set")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # bare words are strings
    return key.split("."), value


def _apply_override(data: dict[str, Any], parts: list[str], value: Any, item: str) -> None:
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"'{'.'.join(parts[: i + 1])}' is not an index of the list", "--set")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise RecipeError(f"'{'.'.join(parts[: i + 1])}' is not a table", "--set")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise RecipeError(f"'{'.'.join(parts)}' is not an index of the list", "--set")
        node[int(last)] = value
    else:
        node[last] = value


def load_recipe(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Load a TOML recipe strictly and apply ``--set`` overrides.

    ``path`` may be a file or a bare name of a shipped recipe (``tiny``, ``small``, ``bagel-7b``).
    """
    source = "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists() and not p.suffix and (RECIPES_DIR / f"{p}.toml").exists():
            p = RECIPES_DIR / f"{p}.toml"
        if not p.is_file():
            raise RecipeError("recipe file not found; pass a .toml file or one of tiny, small, bagel-7b", str(p))
        source = str(p)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise RecipeError(f"invalid TOML: {exc}", source) from exc
    for item in overrides:
        parts, value = _parse_override(item)
        _apply_override(data, parts, value, item)
        source = f"{source} (with --set)" if "--set" not in source else source
    recipe = _build(Recipe, data, "", source)
    validate_recipe(recipe, source)
    return recipe


def validate_recipe(recipe: Recipe, source: str = "<recipe>") -> None:
    """Cross-field checks (stage order, model shapes) naming the field at fault."""
    names = [s.name for s in recipe.train.stages]
    order = [STAGE_ORDER.index(n) for n in names]
    if order != sorted(order) or len(set(names)) != len(names):
        raise RecipeError(
            f"'train.stages' must be listed in the order {' -> '.join(STAGE_ORDER)} without repeats, got {' -> '.join(names)}",
            source,
        )
    try:
        validate_model_config(recipe.model, prefix="model.")
    except ValueError as exc:
        raise RecipeError(str(exc), source) from exc
    lat = recipe.data.image_size // recipe.model.vae.downsample // recipe.model.latent_patch_size
    if lat > recipe.model.max_latent_size:
        raise RecipeError(
            f"'model.max_latent_size' ({recipe.model.max_latent_size}) is smaller than the latent grid "
            f"{lat} of data.image_size={recipe.data.image_size}", source)
    vit = recipe.data.image_size // recipe.model.vit.patch_size
    if vit > min(recipe.model.vit.max_patches_per_side, recipe.model.vit_max_num_patch_per_side):
        raise RecipeError(
            f"'model.vit.max_patches_per_side' is smaller than the ViT grid {vit} of data.image_size", source)
    if recipe.data.image_size % (recipe.model.vae.downsample * recipe.model.latent_patch_size):
        raise RecipeError("'data.image_size' must be a multiple of the VAE downsample x latent patch size", source)
    if recipe.data.flow_draws < 1:
        raise RecipeError(f"'data.flow_draws' must be at least 1, got {recipe.data.flow_draws}", source)
    if recipe.data.draft_pairs < 0:
        raise RecipeError(f"'data.draft_pairs' must be >= 0, got {recipe.data.draft_pairs}", source)
    for name in ("draft_flip_prob", "understanding_flip_prob", "understanding_all_prob", "canonical_order_prob"):
        value = getattr(recipe.data, name)
        if not 0.0 <= value <= 1.0:
            raise RecipeError(f"'data.{name}' must be a probability in [0, 1], got {value}", source)
    limits = {"understanding_rotate_deg": 90.0, "understanding_shift_px": recipe.data.image_size / 4,
              "understanding_scale": 0.5}
    for name, limit in limits.items():
        value = getattr(recipe.data, name)
        if not 0.0 <= value < limit:
            raise RecipeError(f"'data.{name}' must be >= 0 and below {limit:g}, got {value}", source)
    if recipe.data.draft_views not in DRAFT_VIEWS:
        raise RecipeError(f"'data.draft_views' must be one of {sorted(DRAFT_VIEWS)}, got {recipe.data.draft_views}",
                          source)
    if recipe.model.aligned_draft and not recipe.data.draft_pairs:
        raise RecipeError("'model.aligned_draft' needs 'data.draft_pairs' > 0: the draft network is trained only "
                          "on those pairs", source)


def save_resolved(recipe: Recipe, out_dir: str | Path, name: str = "recipe.resolved.toml") -> Path:
    """Write the resolved recipe next to an output (atomically); returns its path."""
    path = Path(out_dir) / name
    write_text(path, "# resolved UniBrain recipe (all defaults filled in)\n" + dumps_toml(recipe_to_dict(recipe)))
    return path


def config_from_dict(cls: type[T], data: dict[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Strictly build any config dataclass from a plain dict (unknown keys / wrong types name the path)."""
    return typing.cast(T, _build(cls, data, prefix, source))


def recipe_from_dict(data: dict[str, Any], source: str = "<dict>") -> Recipe:
    """Strictly build a recipe from a plain dict (e.g. a checkpoint's saved config)."""
    recipe = _build(Recipe, data, "", source)
    validate_recipe(recipe, source)
    return recipe
