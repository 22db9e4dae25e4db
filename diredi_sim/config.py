"""One typed config, converted once at each boundary (TOML file, Flower run_config, CLI flags).

Every section is a frozen dataclass; every root (``ExperimentConfig`` here, ``FederationConfig``
in :mod:`diredi_sim.federation_config`, the paper's experiment + ``[pipeline]``) goes through the same
three functions. ``load_config(path, overrides, cls=...)`` reads TOML with tomllib and sets the
``--set`` overrides into it; ``config_from_dict`` checks every key and type and names the one at
fault (``data.synthetic.num_train: expected int, got 'many'``), for the sections' own value checks
too (a ``ValueError`` there becomes a ``ConfigError`` naming the section). ``to_flat`` /
``from_flat`` turn a config into the flat, dotted, kebab-case scalar map that Flower's run_config
and ConfigRecords carry (``train.batch-size = 16``; a list as comma-separated text) and back.
"""

from __future__ import annotations

import math
import shlex
import tomllib
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from diredi_sim.compute import check_device_name
from diredi_sim.data.splits import resolve_split
from diredi_sim.data.synthetic import SyntheticConfig, validate_config


class ConfigError(ValueError):
    """A config key that is unknown, of the wrong type or out of range; the message names it."""


def check_device(name: str) -> None:
    """The ``device`` key is one of the accepted spellings (whether the device exists is checked
    where it is used: a config may be written on one machine and run on another)."""
    try:
        check_device_name(name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check(condition: bool, key: str, value: Any, requirement: str) -> None:
    if not condition:
        raise ConfigError(f"{key} = {value!r}: {requirement}")


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"  # synthetic | voc
    voc_root: str = ""  # a VOCdevkit root, a year folder, or a parent of VOCdevkit/
    year: str = ""  # "2007" / "2012" when voc_root holds both
    train_set: str = "train"
    val_set: str = "val"
    test_set: str = "test"
    cache_dir: str = ""  # where the synthetic set is generated; "" = $DIREDI_SIM_CACHE or .cache/diredi-sim
    # Share of every image set (train, val, test) that is the manufacturer's public pool; the rest
    # is the customers' pool. An image belongs to one pool only, by a hash of its id.
    public_fraction: float = 0.5
    # A VOC folder that holds the manufacturer's public images only. Set, the manufacturer's
    # process (the ServerApp and its workers) reads its data from there and nothing else: a copy
    # of the public pool (`diredi-sim export-public CONFIG FOLDER`) gives the same results as the data source's
    # public pool, with no customer's file reachable. "" = the public pool of the source above.
    manufacturer_root: str = ""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self):
        _check(self.source in ("synthetic", "voc"), "data.source", self.source, "must be 'synthetic' or 'voc'")
        _check(math.isfinite(self.public_fraction) and 0 < self.public_fraction < 1, "data.public_fraction",
               self.public_fraction, "must be in (0, 1): both the manufacturer and the customers need images")
        _check(self.source != "voc" or bool(self.voc_root), "data.voc_root", self.voc_root, "must name a VOCdevkit folder when data.source = 'voc'")
        try:
            validate_config(self.synthetic)
        except ValueError as exc:
            raise ConfigError(f"data.synthetic: {exc}") from None


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 12
    batch_size: int = 16
    optimizer: str = "adamw"  # sgd | adamw (AdamW learned fastest from scratch in our measurements)
    lr: float = 0.003
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.05
    warmup_steps: int = 50
    grad_clip: float = 10.0  # max gradient norm; 0 disables
    hflip_prob: float = 0.5
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    score_threshold: float = 0.5  # for precision / recall / F1 (best F1 of 0.3-0.6 for the demo edge model)
    num_workers: int = 0  # DataLoader workers
    # fp32, or bf16: backbone + FPN under bf16 autocast, head and losses in fp32 (autocast over the
    # whole detector froze FCOS's box loss; this kept fp32's loss curve). Evaluation stays fp32.
    precision: str = "fp32"
    channels_last: bool = False  # models in channels_last memory while they train (on every device; off: bit-exact fp32 results)
    max_train_images: int = 0  # 0 = all; a cap for quick runs
    max_eval_images: int = 0
    max_steps: int = 0  # > 0: exactly this many optimizer steps instead of `epochs` epochs (the last epoch cut short)

    def __post_init__(self):
        for key in ("epochs", "batch_size"):
            _check(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), "must be >= 1")
        _check(self.optimizer in ("sgd", "adamw"), "train.optimizer", self.optimizer, "must be 'sgd' or 'adamw'")
        _check(self.precision in ("fp32", "bf16"), "train.precision", self.precision, "must be 'fp32' or 'bf16'")
        _check(self.lr > 0, "train.lr", self.lr, "must be > 0")
        _check(0 <= self.momentum < 1, "train.momentum", self.momentum, "must be in [0, 1)")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        _check(0 <= self.hflip_prob <= 1, "train.hflip_prob", self.hflip_prob, "must be in [0, 1]")
        _check(0 <= self.score_threshold <= 1, "train.score_threshold", self.score_threshold, "must be in [0, 1]")
        for key in ("warmup_steps", "num_workers", "max_train_images", "max_eval_images", "grad_clip", "max_steps"):
            _check(getattr(self, key) >= 0, f"train.{key}", getattr(self, key), "must be >= 0")
        _check(self.eval_every >= 1, "train.eval_every", self.eval_every, "must be >= 1")


@dataclass(frozen=True)
class WeightsConfig:
    """Where each role's model starts: "" = random initialisation (the default: nothing is
    downloaded); a local file (a state dict or a checkpoint of the whole detector, or of a
    torchvision classification model whose weights start the backbone trunk); or
    ``torchvision:<weights name>`` (e.g. ``torchvision:ResNet50_Weights.IMAGENET1K_V2``), which
    torchvision downloads on a machine that allows it. See ``diredi_sim.models.load_initial_weights``."""

    teacher: str = ""
    tutor: str = ""
    edge: str = ""


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "demo"
    seed: int = 0
    preset: str = "cpu"  # cpu | paper
    role: str = "edge"  # teacher | tutor | edge (for direct training)
    split: str = "all"  # a split preset (diredi_sim.data.splits) or comma-separated class names
    runs_dir: str = "runs"
    threads: int = 0  # torch threads; 0 = torch's default
    device: str = "auto"  # cpu | cuda | cuda:N | auto (the first GPU this process sees, else the CPU); see diredi_sim/compute.py
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)  # the trained role starts from weights.<role>
    tensorboard: bool = False  # also write every metrics row as TensorBoard scalars to <run>/tensorboard/ (needs the tensorboard package)

    def __post_init__(self):
        _check(self.preset in ("cpu", "paper"), "preset", self.preset, "must be 'cpu' or 'paper'")
        _check(self.role in ("teacher", "tutor", "edge"), "role", self.role, "must be 'teacher', 'tutor' or 'edge'")
        _check(self.threads >= 0, "threads", self.threads, "must be >= 0")
        check_device(self.device)
        try:
            resolve_split([c.strip() for c in self.split.split(",")] if "," in self.split else self.split)
        except ValueError as exc:
            raise ConfigError(f"split = {self.split!r}: {exc}") from None


def _type_hints(cls: type) -> dict[str, Any]:
    """The field types of ``cls``, each base's annotations read in its own module (a subclass in
    another module, such as the paper's config, inherits ExperimentConfig's)."""
    return typing.get_type_hints(cls)


def _convert(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table (section), got {value!r}")
        return config_from_dict(annotation, value, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(annotation)):
            return None
        errors = []
        for option in options:
            try:
                return _convert(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        item = args[0] if args else Any
        items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # nan would switch a check off silently (every comparison with it is false)
            raise ConfigError(f"{key} = {value!r}: must be a finite number")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {annotation!r}")


# Keys that moved, old -> new, for the unknown-key error (filled by the module that owns the new key,
# e.g. server.engine, for the settings that left the simulation section).
MOVED_KEYS: dict[str, str] = {}


def config_from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys and wrong types name the key."""
    hints = _type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        key = prefix + unknown[0]
        if key in MOVED_KEYS:
            raise ConfigError(f"{key} has moved: it is {MOVED_KEYS[key]} now")
        raise ConfigError(f"unknown key {key} (known keys in this section: {', '.join(sorted(known))})")
    defaults = {f.name: f for f in fields(cls)}
    kwargs = {name: _convert(_with_section_defaults(value, defaults[name]), hints[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:  # ConfigError, or a section's own check (VerifyConfig, FGDConfig) raising ValueError
        raise ConfigError(_prefixed(prefix, str(exc))) from None


def _prefixed(prefix: str, message: str) -> str:
    """``message`` under the key path ``prefix``, where the message may already name part of it
    (``verify.critical_classes: ...`` under ``pipeline.verify.``)."""
    parts = prefix.rstrip(".").split(".") if prefix else []
    for i in range(len(parts) + 1):
        tail = ".".join(parts[i:])
        if not tail or message.startswith(tail + ".") or message.startswith(tail + " "):
            return ".".join(parts[:i]) + ("." if i else "") + message
    return message


def _with_section_defaults(value: Any, spec: Any) -> Any:
    """A section given in part (a table) completed from the field's own default section, not from
    its class's defaults: ``[baselines.local] max_train_images = 7`` keeps the other values of
    BaselineConfig's ``local`` (1 epoch at lr 0.001), not TrainConfig's (12 epochs at 0.003)."""
    if not isinstance(value, dict):
        return value
    if spec.default_factory is not MISSING:
        default = spec.default_factory()
    else:
        default = spec.default
    if not is_dataclass(default):
        return value
    return {**{k: v for k, v in asdict(default).items() if k not in value and k in {f.name for f in fields(default) if f.init}},
            **value}


def read_toml(path: str | Path) -> dict:
    """A TOML file as a dict; a missing or malformed file is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def load_config(path: str | Path, overrides: dict[str, Any] | None = None, *, cls: type = ExperimentConfig,
                overrides_source: str = "--set") -> Any:
    """Read a TOML config file as ``cls`` (ExperimentConfig, FederationConfig, ...); ``overrides``
    are flat dotted keys (``train.epochs``, ``simulation.num-rounds``; a list key may be given as
    comma-separated text). The file is checked alone first, so that an error names the file or
    ``overrides_source``."""
    path = Path(path)
    data = read_toml(path)
    try:
        config = config_from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not overrides:
        return config
    for key, value in _nested(overrides, cls).items():
        _merge(data, key, value)
    try:
        return config_from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{overrides_source}: {exc}") from None


def _merge(data: dict, key: str, value: Any) -> None:
    if isinstance(value, dict) and isinstance(data.get(key), dict):
        for k, v in value.items():
            _merge(data[key], k, v)
    else:
        data[key] = value


def to_flat(config: Any, prefix: str = "") -> dict[str, Any]:
    """Flat, dotted, kebab-case keys with scalar values (Flower's run_config and ConfigRecords): a
    tuple or list becomes comma-separated text (class names and setting names hold no comma), one
    item with a trailing comma (``"cat,"``), so that a field taking a preset name or a list of
    class names reads it back as the list it was."""
    flat: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        key = prefix + f.name.replace("_", "-")
        if is_dataclass(value):
            flat.update(to_flat(value, key + "."))
        else:
            flat[key] = ",".join(map(str, value)) + ("," if len(value) == 1 else "") if isinstance(value, (tuple, list)) else value
    return flat


def from_flat(flat: dict[str, Any], cls: type = ExperimentConfig, source: str = "") -> Any:
    """Inverse of :func:`to_flat` (also accepts real lists); errors name ``source`` and the key."""
    try:
        return config_from_dict(cls, _nested(flat, cls))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None


def _nested(flat: dict[str, Any], cls: type) -> dict:
    """Flat dotted keys (kebab or snake case) as a nested dict; text for a list field (or for a
    field that takes a name or a list, when it holds a comma) split at its commas."""
    nested: dict = {}
    for key, value in flat.items():
        parts = key.replace("-", "_").split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {'.'.join(parts[:-1])} is not a section")
        if isinstance(value, str) and _takes_list(cls, parts, comma="," in value):
            value = [v.strip() for v in value.split(",") if v.strip()]
        node[parts[-1]] = value
    return nested


def _takes_list(cls: type, parts: Sequence[str], *, comma: bool) -> bool:
    for part in parts:
        if not is_dataclass(cls):
            return False
        annotation = _type_hints(cls).get(part)
        if annotation is None:
            return False
        cls = annotation
    origin = typing.get_origin(cls)
    if origin in (tuple, list):
        return True
    if origin in (typing.Union, types.UnionType):
        return comma and any(typing.get_origin(a) in (tuple, list) for a in typing.get_args(cls))
    return False


def parse_overrides(pairs: Sequence[str] | None, source: str = "--set") -> dict[str, Any]:
    """``KEY=VALUE`` pairs (``--set`` on the command line, ``set`` in Flower's run_config) as flat
    dotted keys; values are read as TOML scalars (3, 0.1, true, "text"), else kept as text."""
    overrides = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"{source} {pair!r}: expected KEY=VALUE, e.g. pipeline.rd.epochs=3")
        key, raw = pair.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        overrides[key.strip()] = value
    return overrides


def parse_pairs(text: str, source: str) -> dict[str, Any]:
    """``KEY=VALUE`` pairs in one string, separated by spaces, quoted as a shell quotes
    (Flower's run_config ``set``, ``baselines.strategy_args``), read as :func:`parse_overrides` reads them."""
    try:
        pairs = shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"{source} = {text!r}: {exc}") from None
    return parse_overrides(pairs, source=source)


def with_overrides(config: Any, **changes: Any) -> Any:
    """dataclasses.replace that also accepts dotted keys: with_overrides(c, **{"train.epochs": 1})."""
    nested: dict[str, dict] = {}
    direct = {}
    for key, value in changes.items():
        if "." in key:
            head, rest = key.split(".", 1)
            nested.setdefault(head, {})[rest] = value
        else:
            direct[key] = value
    for head, sub in nested.items():
        direct[head] = with_overrides(getattr(config, head), **sub)
    return replace(config, **direct)


__all__ = [
    "ConfigError", "DataConfig", "TrainConfig", "ExperimentConfig", "SyntheticConfig",
    "config_from_dict", "load_config", "read_toml", "to_flat", "from_flat", "with_overrides",
]
