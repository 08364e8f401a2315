"""The checkpoint cache's code hash covers what a model imports (no hand-kept module list)."""

from __future__ import annotations

import pytest

from bench.models import MODELS, base


@pytest.mark.parametrize("name", [n for n in MODELS.names() if MODELS.get(n).__module__.startswith("bench.")])
def test_every_model_hashes_its_module_and_the_base(name):
    cls = MODELS.get(name)
    mods = base.bench_imports(cls.__module__)
    assert cls.__module__ in mods and "bench.models.base" in mods
    assert all(m == "bench" or m.startswith("bench.") for m in mods)


def test_the_closure_follows_imports_through_other_modules():
    mods = base.bench_imports("bench.models.jem_factored")
    # jem_factored imports jem, which imports wrn, training and the SGLD sampler
    assert {"bench.models.jem", "bench.models.wrn", "bench.models.training", "bench.samplers.sgld"} <= set(mods)
    assert "bench.samplers.sgld" not in base.bench_imports("bench.models.vae")


def test_an_edit_to_an_imported_helper_changes_the_hash_of_its_users_only(monkeypatch):
    jem, vae = MODELS.get("jem"), MODELS.get("vae")
    before = jem.code_version(), vae.code_version()
    real = base._module_source

    def edited(mod_name):
        src = real(mod_name)
        return src + b"\n# an edit\n" if mod_name == "bench.samplers.sgld" else src

    monkeypatch.setattr(base, "_module_source", edited)
    assert jem.code_version() != before[0] and vae.code_version() == before[1]
