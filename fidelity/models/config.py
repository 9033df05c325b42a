"""Typed model configurations, saved as JSON next to checkpoints."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from fidelity.errors import InputError


@dataclass
class ModelConfig:
    """Base of every model configuration: the fields all our language models share."""

    model_type: ClassVar[str] = "base"

    d_model: int = 128  # width of the residual stream
    n_layer: int = 4  # number of residual blocks
    vocab_size: int = 256  # byte-level tokenizer by default
    pad_vocab_size_multiple: int = 8  # embedding rows rounded up (mamba_ssm convention)
    tie_embeddings: bool = True  # LM head shares the embedding matrix (mamba_ssm, Pythia differ)
    norm_epsilon: float = 1e-5  # RMSNorm epsilon (mamba_ssm default)

    @property
    def padded_vocab_size(self) -> int:
        """``vocab_size`` rounded up to ``pad_vocab_size_multiple``."""
        multiple = self.pad_vocab_size_multiple
        return math.ceil(self.vocab_size / multiple) * multiple

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict including ``model_type``."""
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a dict such as :meth:`to_dict` wrote; unknown keys are an error."""
        values = {k: v for k, v in values.items() if k != "model_type"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(
                f"unknown {cls.__name__} fields {unknown}; accepted fields: {sorted(known)}"
            )
        config = cls(**values)
        config.checked()
        return config

    def replace(self, **overrides: Any) -> ModelConfig:
        """A copy with ``overrides`` applied and validated."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise InputError(
                f"unknown {type(self).__name__} options {unknown}; accepted: {sorted(known)}"
            )
        config = dataclasses.replace(self, **overrides)
        config.checked()
        return config

    def checked(self) -> None:
        """:meth:`validate`, with a value of the wrong type (a list for a number, ...) also
        reported as :class:`~fidelity.errors.InputError` naming the config class."""
        try:
            self.validate()
        except (ValueError, TypeError) as error:
            if isinstance(error, InputError):
                raise
            raise InputError(f"invalid {type(self).__name__} settings: {error}") from None

    def validate(self) -> None:
        """Raise ``ValueError`` for impossible settings."""
        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if not self.norm_epsilon > 0:
            raise InputError(f"norm_epsilon must be positive, got {self.norm_epsilon!r}")
