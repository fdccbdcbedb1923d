"""`MethodConfig`: the dataclass base of every training method's hyperparameters.

One rule for all methods: every field carries its help text in `metadata["help"]`
(`metadata["cli"]` marks the ones the `train` command exposes as flags, `metadata["api"]` the
ones a job submitted to the service may set, with the bounds it accepts), `__post_init__`
validates, `from_dict` refuses unknown keys by name, and the JSON form is sorted.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

VALUE_DTYPES = ("float16", "bfloat16", "float32")

C = TypeVar("C", bound="MethodConfig")


class ConfigError(ValueError):
    """An impossible or unknown hyperparameter; `field` names it."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def option(
    default: Any,
    help: str,
    *,
    cli: bool = False,
    choices: tuple[str, ...] | None = None,
    api: dict[str, Any] | None = None,
) -> Any:
    """A dataclass field with its help text, whether the `train` CLI exposes it, its choices,
    and `api`: the bounds a job submitted to the service may ask (pydantic's `ge`, `gt`, `le`,
    `lt`; None: the service does not take it)."""
    metadata: dict[str, Any] = {"help": help, "cli": cli}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if api is not None:
        metadata["api"] = dict(api)
    return field(default=default, metadata=metadata)


@dataclass(kw_only=True)
class MethodConfig:
    """Hyperparameters every method has; subclasses add their own and extend `validate`."""

    error: ClassVar[type[ConfigError]] = ConfigError
    # Fields that may differ between a run and its resumption from a checkpoint.
    resumable_changes: ClassVar[frozenset[str]] = frozenset(
        {"device", "checkpoint_every", "eval_batch_size"}
    )

    lr: float = option(
        1e-4,
        "learning rate of the diff values in phase 1 (AdamW, warmup + linear decay)",
        cli=True,
        api={"gt": 0.0, "le": 1.0},
    )
    alpha_lr: float = option(0.1, "learning rate of the gate logits (plain SGD, constant)")
    alpha_init: float = option(5.0, "initial gate logit (the gates start open)")
    l0_lambda: float = option(1.25e-7, "penalty per expected nonzero (Guo et al. 2021)")
    warmup: float = option(0.1, "fraction of each phase's steps spent warming the lr up")
    seed: int = option(
        0, "seed of every random draw of the run", cli=True, api={"ge": 0, "le": 2**31 - 1}
    )
    value_dtype: str = option("float16", "dtype of the stored diff values")
    device: str = option("", "cpu, cuda, cuda:1 ('' = cuda when available, else cpu)", cli=True)
    eval_batch_size: int = option(64, "rows per evaluation batch")
    checkpoint_every: int = option(50, "optimizer steps between checkpoints (with a CheckpointIO)")

    def __post_init__(self) -> None:
        self.validate()

    def fail(self, name: str, message: str) -> None:
        """Raise this config's error type for field `name`."""
        raise self.error(message, field=name)

    def validate(self) -> None:
        """Raise the config's error naming the first field with an impossible value."""
        for name in ("lr", "alpha_lr", "l0_lambda"):
            if getattr(self, name) < 0:
                self.fail(name, f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup < 1.0:
            self.fail("warmup", f"warmup must be in [0, 1), got {self.warmup}")
        if self.value_dtype not in VALUE_DTYPES:
            self.fail(
                "value_dtype",
                f"value_dtype must be one of {VALUE_DTYPES}, got {self.value_dtype!r}",
            )
        for name in ("eval_batch_size", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                self.fail(name, f"{name} must be at least 1, got {getattr(self, name)}")
        for spec in dataclasses.fields(self):
            choices = spec.metadata.get("choices")
            if choices is not None and getattr(self, spec.name) not in choices:
                self.fail(
                    spec.name,
                    f"{spec.name} must be one of {', '.join(choices)}, "
                    f"got {getattr(self, spec.name)!r}",
                )

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict (JSON types only)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The config as sorted JSON, as stored in the artifact meta."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """A config from a dict; unknown keys are an error naming them."""
        unknown = sorted(set(data) - set(field_names(cls)))
        if unknown:
            raise cls.error(
                f"unknown {cls.__name__} fields: {', '.join(unknown)}", field=unknown[0]
            )
        return cls(**data)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        """Inverse of `to_json`."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def api_fields(cls) -> list[dataclasses.Field]:
        """The fields a job submitted to the service may set (`metadata["api"]`: their bounds)."""
        return [f for f in dataclasses.fields(cls) if "api" in f.metadata]

    @classmethod
    def value_type(cls, name: str) -> type:
        """The type field `name` takes when set (`float | None` takes a float)."""
        hint = typing.get_type_hints(cls)[name]
        return next((t for t in typing.get_args(hint) if t is not type(None)), hint)


def field_names(cls: type[MethodConfig]) -> list[str]:
    """The names of a config class's fields, in declaration order."""
    return [f.name for f in dataclasses.fields(cls)]


def cli_fields(cls: type[MethodConfig]) -> list[dataclasses.Field]:
    """The fields a command line exposes as flags (`metadata["cli"]`)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli")]
