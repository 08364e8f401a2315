"""`scale=small` is sized by the data (bench.scales): the embedded digits keep the recipes tuned on them, and
MNIST-, Fashion- and CIFAR-sized train splits get each model's step budget, so a small run stays minutes."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import bench.models  # noqa: F401  (registers every model)
from bench.data.base import Split
from bench.models.base import MODELS, DataInfo, TrainContext, passes, planned_steps
from bench.scales import Scale, epochs_within, large_images, scale_epochs, small_epochs

DIGITS = DataInfo((1, 8, 8), 10, False, 1437)
MNIST = DataInfo((1, 28, 28), 10, False, 60_000)
CIFAR_JPEG = DataInfo((3, 32, 32), 10, True, 8_000)  # the CIFAR-10 JPEG copy's 80% train split
#: no small recipe on MNIST- or CIFAR-sized data may plan more optimizer steps than this
MAX_LARGE_STEPS = 3000
#: bench's own models (other test modules register test doubles in the same registry)
BENCH_MODELS = [n for n in MODELS.names() if MODELS.get(n).__module__.startswith("bench.models.")]


def test_epochs_within_caps_the_steps_and_keeps_short_schedules():
    assert epochs_within(25, 64, 1437, 700) == 25  # digits: 22 steps per epoch, 550 in all
    e = epochs_within(25, 64, 60_000, 700)
    assert e == round(700 / 937, 4) and planned_steps(e, 937, None) == 700
    assert epochs_within(25, 64, 0, 700) == 25  # unknown size: the recipe as tuned
    assert epochs_within(2, 64, 8_000, 700) == 2  # 250 steps fit the budget
    assert scale_epochs((18, 22), 25, 25) == (18, 22)
    assert scale_epochs((18, 22), 25, 0.5) == (0.36, 0.44)


def test_planned_steps_and_passes():
    assert planned_steps(25, 22, None) == 550 and planned_steps(25, 22, 4) == 4
    assert planned_steps(0.0001, 22, None) == 1  # never a run of no steps
    assert passes(550, 22) == 25 and isinstance(passes(550, 22), int)
    assert passes(700, 937) == round(700 / 937, 4)


@pytest.mark.parametrize("shape,large", [((1, 8, 8), False), ((1, 16, 16), False), ((3, 16, 16), False),
                                         ((1, 28, 28), True), ((3, 32, 32), True), ((1, 17, 16), True)])
def test_large_images(shape, large):
    assert large_images(shape) is large


@pytest.mark.parametrize("name", BENCH_MODELS)
def test_digits_recipes_do_not_depend_on_the_train_size(name):
    """On 8×8 digits the small recipe is the one tuned there, whatever n_train says (the digits numbers and
    times stay as they were)."""
    cls = MODELS.get(name)
    assert cls.recipe(Scale.small, DIGITS) == cls.recipe(Scale.small, DataInfo((1, 8, 8), 10, False, 0))
    assert small_epochs(DIGITS, 25, 64, 1) == 25


class _Planned(BaseException):
    pass


def _planned_total(name: str, info: DataInfo) -> int | None:
    """The optimizer steps a model's small-recipe ``fit`` announces to its progress bar; None: no loop."""
    cls = MODELS.get(name)
    model = cls(cls.recipe(Scale.small, info), info)
    n = info.n_train
    train = Split(torch.zeros((n, *info.shape), dtype=torch.uint8), torch.arange(n) % info.n_classes)
    seen: dict[str, int] = {}

    @contextmanager
    def progress(description: str, total: int):
        seen["total"] = int(total)
        raise _Planned
        yield  # pragma: no cover

    torch.manual_seed(0)
    try:
        model.fit(train, TrainContext(device=torch.device("cpu"), seed=0, progress=progress))
    except _Planned:
        pass
    return seen.get("total")


@pytest.mark.parametrize("info", [MNIST, CIFAR_JPEG], ids=["mnist", "cifar10-jpeg"])
@pytest.mark.parametrize("name", BENCH_MODELS)
def test_small_recipes_on_real_data_plan_a_bounded_run(name, info):
    """Before this sizing, jem planned 23,425 steps on MNIST (about 125 hours on 2 cores)."""
    total = _planned_total(name, info)
    if total is None:
        return  # nothing to train (pixel_independent counts the data)
    assert 0 < total <= MAX_LARGE_STEPS, f"{name} plans {total} steps on {info.shape} × {info.n_train}"


def test_the_domain_extractor_is_sized_by_the_train_split():
    """Its 30 passes over MNIST would be 28,140 steps (54 minutes on one thread); digits keep the 30 passes
    of the shipped weights."""
    from types import SimpleNamespace

    from bench.features import domain

    def data(n: int, shape=(1, 28, 28)):
        return SimpleNamespace(shape=shape, n_classes=10, train=range(n))

    assert domain.config_for(data(1437, (1, 8, 8))).epochs == 30
    mnist = domain.config_for(data(60_000))
    assert planned_steps(mnist.epochs, 938, None) == domain.MAX_STEPS
    assert domain.config_for(data(8_000, (3, 32, 32))).epochs == round(domain.MAX_STEPS / 125, 4)


@pytest.mark.parametrize("name", ["jem", "jem_factored"])
@pytest.mark.parametrize("info", [MNIST, CIFAR_JPEG], ids=["mnist", "cifar10-jpeg"])
def test_jems_small_recipe_on_larger_images_trains_with_the_energy_penalty_and_says_so(info, name):
    """At lr 1e-4 the 700-step recipe learned 16.6% on the CIFAR-10 JPEGs and still diverged on MNIST; with
    IGEBM's energy penalty at 0.1 lr 1e-3 is stable (81.9%, 30.3%). jem_factored diverged too (MNIST) or
    learned one class (CIFAR) and shares the recipe. Digits keep their recipe."""
    from bench.models import MODELS
    from bench.models.jem import LARGE_ENERGY_L2

    cls = MODELS.get(name)
    c = cls.recipe(Scale.small, info)
    # grey images start the chains from JEM++'s class Gaussians; jem's are stable at lr 3e-3 (MNIST 78.8% -> 94.3%)
    informed = info.shape[0] == 1
    lr = 3e-3 if informed and name == "jem" else 1e-3
    assert (c.lr, c.energy_l2, c.depth, c.width) == (lr, LARGE_ENERGY_L2, 10, 1)
    assert c.chain_init == ("class_gaussian" if informed else "uniform") and LARGE_ENERGY_L2 > 0
    deviations = cls(c, info).deviations(Scale.small)
    assert any(d.startswith("energy_l2=0.1 (paper: 0.0): IGEBM's") for d in deviations), deviations
    assert informed == any(d.startswith("chain_init=class_gaussian (paper: uniform): JEM++'s") for d in deviations)
    digits = cls.recipe(Scale.small, DIGITS)
    assert (digits.lr, digits.energy_l2, digits.width) == (1e-3, 0.0, 2)
    assert cls.recipe(Scale.tiny, info).energy_l2 == 0.0 and cls.recipe(Scale.paper, info).energy_l2 == 0.0


@pytest.mark.parametrize("name", ["glow", "glow_hybrid"])
def test_glows_small_recipe_on_a_run_shorter_than_an_epoch_averages_its_twentieth_with_additive_couplings(name):
    """Digits (20 epochs) and the CIFAR-10 JPEGs (3.2) keep openai/glow's one-epoch average and affine couplings;
    MNIST-sized data (400 steps of a 938-step epoch) averages over a twentieth of the run, as on digits, and
    couples additively; both differences are listed as deviations from the paper recipe."""
    cls = MODELS.get(name)
    for info in (DIGITS, CIFAR_JPEG):
        c = cls.recipe(Scale.small, info)
        assert (c.coupling, c.polyak_epochs) == ("affine", 1.0)
        assert c.epochs >= 1
    c = cls.recipe(Scale.small, MNIST)
    assert c.epochs < 1 and c.coupling == "additive"
    assert c.polyak_epochs == pytest.approx(c.epochs / 20, abs=1e-4)
    steps_per_epoch = -(-MNIST.n_train // c.batch_size)
    assert 15 <= steps_per_epoch * c.polyak_epochs <= 25  # the average's horizon: about 20 of the 400 steps
    model = cls(c, MNIST)
    assert model._beta2(steps_per_epoch) == pytest.approx(1 - 1 / (steps_per_epoch * c.polyak_epochs))
    deviations = " ".join(model.deviations(Scale.small))
    assert "additive couplings" in deviations and "a twentieth of a run" in deviations


def test_jems_small_recipe_trains_grey_large_images_longer_and_weighs_their_px_term_less():
    """MNIST-sized grey images: 2,800 updates (97.41% on MNIST, against 95.56% at 700) with log p(x) at a
    quarter of log p(y|x)'s weight, declared as a deviation; CIFAR-sized colour images keep 700 updates at the
    reference's equal weights; the lr decays stay at the same fractions of the run; digits are unchanged."""
    from bench.models.jem import LARGE_PX_WEIGHT_GREY, LARGE_STEPS, LARGE_STEPS_GREY

    cls = MODELS.get("jem")
    grey, colour = cls.recipe(Scale.small, MNIST), cls.recipe(Scale.small, CIFAR_JPEG)
    assert _planned_total("jem", MNIST) == LARGE_STEPS_GREY == 2800
    assert _planned_total("jem", CIFAR_JPEG) == LARGE_STEPS == 700
    for c in (grey, colour):
        assert [round(d / c.epochs, 2) for d in c.decay_epochs] == [0.72, 0.88]
        assert c.pyx_weight == 1.0
    assert (grey.px_weight, colour.px_weight) == (LARGE_PX_WEIGHT_GREY, 1.0) and 0 < LARGE_PX_WEIGHT_GREY < 1
    assert any(d.startswith(f"px_weight={LARGE_PX_WEIGHT_GREY} (paper: 1.0): log p(x) weighed less")
               for d in cls(grey, MNIST).deviations(Scale.small))
    assert not any(d.startswith("px_weight") for d in cls(colour, CIFAR_JPEG).deviations(Scale.small))
    digits = cls.recipe(Scale.small, DIGITS)
    assert (digits.epochs, digits.px_weight) == (25, 1.0)
