"""The YAML keys: `lora_init: fisher` and every `FisherConfig` field as `fisher_<field>`.

Axolotl merges `FisherArgs` into its config model when the plugin is listed, so the keys are typed
and validated with the rest of the YAML; a bad value fails before any model is loaded, with a message
that names the key (e.g. `fisher_num_batches`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field, ValidationError, create_model, model_validator

from fisher_core import FisherConfig
from fisher_core.config import fisher_type_from_yaml

PREFIX = "fisher_"


def fisher_config(cfg: Any, **overrides: Any) -> FisherConfig:
    """The `FisherConfig` of an Axolotl config (a dict, `DictDefault` or pydantic model).

    Only the `fisher_<field>` keys that are set count; the rest keep FisherConfig's defaults. Errors
    are raised as `ValueError` naming the YAML key.
    """
    get = cfg.get if isinstance(cfg, Mapping) else lambda key: getattr(cfg, key, None)
    values = {name: get(PREFIX + name) for name in FisherConfig.model_fields}
    values = {k: v for k, v in values.items() if v is not None} | overrides
    try:
        return FisherConfig(**values)
    except ValidationError as err:
        problems = "; ".join(
            f"{PREFIX}{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else e["msg"] for e in err.errors()
        )
        raise ValueError(f"invalid fisher-lora settings: {problems}") from None


class _LoraInitArgs(BaseModel):
    lora_init: Literal["fisher"] | None = Field(
        None, description="`fisher` initializes the LoRA adapter from Fisher statistics of the training data."
    )

    @model_validator(mode="before")
    @classmethod
    def _yaml_true(cls, data: Any) -> Any:
        key = PREFIX + "fisher_type"
        if isinstance(data, Mapping) and key in data:
            return {**data, key: fisher_type_from_yaml(data[key])}
        return data

    @model_validator(mode="after")
    def _check_fisher_keys(self) -> _LoraInitArgs:
        merged = "adapter" in type(self).model_fields  # inside Axolotl's config model, not standalone
        if self.lora_init == "fisher" and merged and self.adapter not in ("lora", "qlora"):
            raise ValueError(f"lora_init: fisher needs adapter: lora or qlora, not adapter: {self.adapter}")
        fisher_config(self)
        return self


def _yaml_type(annotation: Any) -> Any:
    """The field's type as a YAML key: optional, and paths as plain strings (Axolotl dumps its config as JSON);
    `keep_data`'s batches cannot be written in YAML, its file can."""
    return str | None if Path in get_args(annotation) else annotation | None


FisherArgs = create_model(
    "FisherArgs",
    __base__=_LoraInitArgs,
    __doc__="Axolotl input args of the fisher-lora plugin (every FisherConfig field, prefixed `fisher_`).",
    **{
        PREFIX + name: (_yaml_type(info.annotation), Field(None, description=info.description))
        for name, info in FisherConfig.model_fields.items()
    },
)
