import pytest

from bench.errors import UnknownNameError
from bench.models import MODELS, BenchModel
from bench.registry import Registry


class Base:
    pass


def test_register_and_get():
    r: Registry[type] = Registry("thing", base=Base)

    @r.register("a")
    class A(Base):
        pass

    assert r.get("a") is A
    assert r.names() == ["a"]
    assert "a" in r and "b" not in r


def test_duplicate_name_refused():
    r: Registry[type] = Registry("thing", base=Base)
    r.add("a", type("A", (Base,), {}))
    with pytest.raises(ValueError, match="duplicate thing name 'a'"):
        r.add("a", type("B", (Base,), {}))


def test_wrong_base_class_refused():
    r: Registry[type] = Registry("thing", base=Base)
    with pytest.raises(TypeError, match="subclass of Base"):
        r.add("x", int)


def test_unknown_name_lists_choices():
    r: Registry[type] = Registry("thing", base=Base)
    r.add("beta", type("B", (Base,), {}))
    r.add("alpha", type("A", (Base,), {}))
    with pytest.raises(UnknownNameError) as e:
        r.get("gamma")
    assert str(e.value) == "unknown thing 'gamma'; valid choices: alpha, beta"


def test_model_registry_holds_the_spine_models():
    for name in ("jem", "wrn", "pixel_independent"):
        cls = MODELS.get(name)
        assert issubclass(cls, BenchModel) and cls.name == name
