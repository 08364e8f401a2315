"""Suites: versioned YAML files in ``bench/suite_specs/`` (package data, read with `importlib.resources`, so a
wheel install has them) naming their metrics, default models and data, and the sample protocol per scale. A
suite's version goes into every record; bump it when a change to the suite changes a number. See
docs/adding-a-suite.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.resources import files

import yaml

from bench.errors import UnknownNameError, UserError
from bench.scales import SCALES

#: the suite files, shipped inside the package (pyproject.toml's package-data)
SUITES_DIR = files("bench") / "suite_specs"


@dataclass(frozen=True)
class Suite:
    name: str
    version: str
    description: str
    models: tuple[str, ...]
    data: str
    metrics: tuple[str, ...]
    n_samples: dict[str, int] = field(default_factory=dict)
    reference: dict[str, str] = field(default_factory=dict)
    sample_batch_size: int = 500
    tolerances: dict[str, str] = field(default_factory=dict)
    #: suite-specific settings (OOD sets, eps grid, ECE bins, ...), overridable from the command line
    settings: dict = field(default_factory=dict)


def suite_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in SUITES_DIR.iterdir()
                  if p.name.endswith(".yaml") and p.is_file())


def load_suite(name: str) -> Suite:
    path = SUITES_DIR / f"{name}.yaml"
    if not name or "/" in name or not path.is_file():
        raise UnknownNameError("suite", name, suite_names())
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    try:
        samples = raw.get("samples", {})
        suite = Suite(
            name=raw["name"], version=str(raw["version"]), description=raw.get("description", ""),
            models=tuple(raw["models"]), data=raw["data"], metrics=tuple(raw["metrics"]),
            n_samples={k: int(v) for k, v in samples.get("n", {}).items()},
            reference=dict(samples.get("reference", {})),
            sample_batch_size=int(samples.get("batch_size", 500)),
            tolerances=dict(raw.get("tolerances", {})),
            settings=dict(raw.get("settings", {})),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"suite file {path} is malformed ({e}); see bench/suite_specs/hybrid.yaml for the layout "
                        "(docs/adding-a-suite.md)") from None
    if suite.name != name:
        raise UserError(f"suite file {path} declares name '{suite.name}'; rename one so they agree")
    for scale in SCALES:
        if suite.n_samples and scale not in suite.n_samples:
            raise UserError(f"suite '{name}' gives no sample count for scale '{scale}' in {path}")
        if suite.reference.get(scale, "test") not in ("train", "test"):
            raise UserError(f"suite '{name}': reference split must be train or test in {path}")
    return suite
