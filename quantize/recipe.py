"""Recipe schema: *what* a variant is. The *how* lives in `quantize.schemes` (a registry by scheme name).

A recipe is one YAML file under `recipes/`; its file name is its name. The schema is strict
(`extra="forbid"`), so a misspelt key fails before any model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qgcore.errors import ConfigError, did_you_mean, format_validation_error
from qgcore.hashing import content_key
from qgcore.quality import RecipeGate
from qgcore.vocab import Family
from quantize.schemes import SCHEMES

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"



class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibrationSpec(Strict):
    """Calibration text. `builtin` is offline text from installed packages; `hub` a datasets id."""

    source: Literal["builtin", "hub", "file"] = "builtin"
    # hub: dataset id (llmcompressor's examples use HuggingFaceH4/ultrachat_200k); file: a .txt/.jsonl path
    dataset: str | None = None
    split: str = "train_sft"
    text_field: str = "text"
    num_samples: int = Field(default=64, ge=1, le=100_000)
    seq_len: int = Field(default=512, ge=16, le=32_768)
    seed: int = 0

    @model_validator(mode="after")
    def _dataset_needed(self) -> CalibrationSpec:
        if self.source in ("hub", "file") and not self.dataset:
            raise ValueError(f"calibration.source '{self.source}' needs calibration.dataset")
        return self


class QuantSpec(Strict):
    scheme: str  # a name from the scheme registry (quantize.schemes.SCHEMES): the one list of schemes
    targets: list[str] = ["Linear"]
    # lm_head stays in bf16: it is small relative to the body and very sensitive (llmcompressor default).
    ignore: list[str] = ["lm_head"]
    group_size: int | None = Field(default=None, ge=1)
    symmetric: bool = True
    # AWQ's scale search: grid points per layer (llmcompressor's AWQModifier n_grid; None = its default, 20).
    # AWQ's time is linear in it (here: 173 s at 20, 87 s at 10 for SmolLM2-135M, 32 x 256 calibration).
    grid_points: int | None = Field(default=None, ge=3, le=200)

    @field_validator("scheme")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if v not in SCHEMES:
            raise ValueError(did_you_mean(v, sorted(SCHEMES), "scheme"))
        return v


class ServeSpec(Strict):
    """How production serves this variant with vLLM; the same flags are used for eval and bench. Tensor
    parallel and the context are the run's (quantgate --tensor-parallel / --max-model-len), not the recipe's:
    they change nothing that is built."""

    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    extra_args: list[str] = []

    @field_validator("extra_args")
    @classmethod
    def _no_run_flags(cls, v: list[str]) -> list[str]:
        run_flags = ("--tensor-parallel-size", "-tp", "--max-model-len", "--kv-cache-dtype")

        def flag(arg: str) -> str:  # as vLLM's parser reads it: underscores are dashes in a long option
            key = arg.split("=")[0]
            return "--" + key[2:].replace("_", "-") if key.startswith("--") else key

        # argparse also takes a unique prefix of a long option (--tensor-parallel, --max-model)
        bad = [a for a in v if flag(a) in run_flags or
               (flag(a).startswith("--") and len(flag(a)) > 2 and any(f.startswith(flag(a)) for f in run_flags))]
        if bad:
            raise ValueError(f"serve.extra_args may not set {bad[0]}: tensor parallel and the context are set per "
                             "run (--tensor-parallel, --max-model-len), the KV cache by serve.kv_cache_dtype")
        return v


class Recipe(Strict):
    name: str
    description: str
    family: Family
    quant: QuantSpec
    calibration: CalibrationSpec | None = None
    serve: ServeSpec = ServeSpec()
    gate: RecipeGate = RecipeGate()  # one declaration, shared with the gate (qgcore.quality)

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        handler = SCHEMES[self.quant.scheme]
        if handler.needs_calibration and self.calibration is None:
            raise ValueError(f"scheme '{self.quant.scheme}' calibrates: add a calibration: section")
        if handler.needs_group_size and self.quant.group_size is None:
            raise ValueError(f"scheme '{self.quant.scheme}' needs quant.group_size (e.g. 64)")
        if handler.fixed_group_size and self.quant.group_size not in (None, handler.fixed_group_size):
            raise ValueError(
                f"scheme '{self.quant.scheme}' has a fixed group size of {handler.fixed_group_size}"
            )
        if self.quant.grid_points is not None and not handler.grid_search:
            raise ValueError(f"quant.grid_points sizes AWQ's scale search; scheme '{self.quant.scheme}' has none")
        if (self.quant.scheme == "none") != (self.family == "reference"):
            raise ValueError("the reference is the recipe with scheme 'none' and family: reference, and only it")
        return self

    def content_hash(self) -> str:
        """Hash of the parsed recipe (not the file bytes), so comments and key order don't matter."""
        return content_key(self.model_dump(mode="json"))

    @property
    def effective_group_size(self) -> int | None:
        return self.quant.group_size or SCHEMES[self.quant.scheme].fixed_group_size


class Sizing(Strict):
    """A smaller calibration (and AWQ search) for a first run on a small machine (`make demo`). It replaces
    what every calibrated recipe says, so it is part of each recipe's content key and of its manifest."""

    num_samples: int = Field(ge=1)
    seq_len: int = Field(ge=16)
    grid_points: int | None = Field(default=None, ge=3)

    def apply(self, recipe: Recipe) -> Recipe:
        if recipe.calibration is None:
            return recipe
        calib = recipe.calibration.model_copy(update={"num_samples": self.num_samples, "seq_len": self.seq_len})
        quant = recipe.quant
        if self.grid_points is not None and SCHEMES[quant.scheme].grid_search:
            quant = quant.model_copy(update={"grid_points": self.grid_points})
        return recipe.model_copy(update={"calibration": calib, "quant": quant})


def available_recipes(recipes_dir: Path = RECIPES_DIR) -> list[str]:
    return sorted(p.stem for p in recipes_dir.glob("*.yaml") if not p.stem.startswith("_"))


def parse_recipe(data: object, *, source: str) -> Recipe:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe must be a YAML mapping")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err, Recipe)) from None


def load_recipe(name_or_path: str | Path, recipes_dir: Path = RECIPES_DIR) -> Recipe:
    """Load by name (`fp8`) from `recipes/` or by path to any YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = recipes_dir / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(did_you_mean(str(name_or_path), available_recipes(recipes_dir), "recipe"))
    elif not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    recipe = parse_recipe(data, source=str(path))
    if recipe.name != path.stem:
        raise ConfigError(f"{path}: name '{recipe.name}' must match the file name '{path.stem}'")
    return recipe


def load_recipes(names: list[str] | None, recipes_dir: Path = RECIPES_DIR) -> list[Recipe]:
    """All recipes (bf16 first) or the named ones; every name is checked before any work starts."""
    names = names or available_recipes(recipes_dir)
    recipes = [load_recipe(n, recipes_dir) for n in names]
    order = {id(r): i for i, r in enumerate(recipes)}
    return sorted(recipes, key=lambda r: (r.family != "reference", order[id(r)]))
