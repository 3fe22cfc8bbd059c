"""The named methods: each is a composition of the objective layer (see ``objective``).

``robustft methods`` lists them in this order with their compositions. Any other
composition is a ``TASK+REG[+REG...][+wise]`` name away (``flyp+cf-fd``, ``ce+l2sp+fd``).
"""

from __future__ import annotations

from robustft.errors import ConfigError, choices_hint
from robustft.methods import zeroshot as _zeroshot  # noqa: F401  (listed first)
from robustft.methods.base import METHODS
from robustft.methods.objective import REGULARISERS, TASKS, ComposedMethod, register_composition
from robustft.methods.wise_ft import WiseStep

__all__ = ["COMPOSE_EXAMPLE", "compose", "composable_parts", "trains", "with_weight_step"]

register_composition("lp", "linear probe: image encoder frozen, only the zero-shot-initialised head trains",
                     task="ce", task_options={"probe": True}, attrs={"probe": True})
register_composition("ft", "end-to-end fine-tuning: cross-entropy on clean images, every weight trains", task="ce")
register_composition("lp-ft", "LP-FT: linear probe (stage 'lp'), then full fine-tuning from the probed head "
                              "(stage 'ft')", stages=("lp", "ft"))
register_composition("wise-ft", "WiSE-FT: fine-tune end to end, then interpolate all weights with zero-shot per "
                                "alpha", task="ce", base=WiseStep)
register_composition("kd", "FT + KD: cross-entropy + T^2 * KL to the frozen zero-shot logits at temperature T, "
                           "clean images", task="ce", regularisers=("kd",))
register_composition("fd", "FT + FD: cross-entropy + MSE to the frozen zero-shot image features, clean images",
                     task="ce", regularisers=("fd",))
register_composition("kd-refill", "CE + T^2 * KL to zero-shot logits on CAM-masked, refilled counterfactual images "
                                  "(default ObjMaskSingleFill(0.3))",
                     task="ce", regularisers=("cf-kd",))
register_composition("fd-refill", "the paper's method: CE + MSE to zero-shot features on CAM-masked, refilled "
                                  "counterfactual images (default ObjMaskSingleFill(0.3))",
                     task="ce", regularisers=("cf-fd",))
register_composition("fd-tokendrop", "CE + MSE to zero-shot features with random patch tokens dropped MAE-style "
                                     "(RandMaskNoFill, default 0.75)",
                     task="ce", regularisers=("tokendrop-fd",))
register_composition("fd-attnmask", "CE + MSE to zero-shot features with attention to CAM-selected patches blocked "
                                    "in every layer (ObjMaskNoFill(0.3) / CtxMaskNoFill)", task="ce",
                     regularisers=("attnmask-fd",))
register_composition("l2sp", "L2-SP: cross-entropy + squared distance of every weight (head included) to the "
                             "zero-shot start, weight method.l2sp_weight", task="ce", regularisers=("l2sp",))
register_composition("flyp", "FLYP: contrastive loss between images and template captions over the global batch; "
                             "both towers train, the head is rebuilt from the text tower", task="contrastive")
register_composition("flyp-fd-refill", "FLYP + the paper's counterfactual feature distillation (contrastive + "
                                       "MSE to zero-shot features on refilled counterfactual images)",
                     task="contrastive", regularisers=("cf-fd",))


# ----------------------------------------------------------------------------- names composed on the fly
_WEIGHT_STEPS = {"wise": WiseStep}
_COMPOSED: dict[str, type[ComposedMethod]] = {}
_WEIGHT_STEP_DESCRIPTIONS = {"wise": "after training, WiSE-FT: interpolate every weight with the zero-shot model "
                                     "at each of method.alphas"}
#: A composed name, for help texts: FLYP with the paper's counterfactual feature distillation.
COMPOSE_EXAMPLE = "flyp+cf-fd"


def _bare_tasks() -> dict[str, str]:
    """Registered methods that are a task objective alone (``ft`` -> ``ce``, ``flyp`` -> ``contrastive``)."""
    out = {}
    for name in METHODS.names():
        cls = METHODS.get(name)
        if (issubclass(cls, ComposedMethod) and cls.trains and not cls.regularisers and not cls.stage_names
                and not cls.interpolates and not cls.task_options):
            out[name] = cls.task
    return out


def compose(name: str) -> type[ComposedMethod] | None:
    """The method ``TASK+REG[+REG...][+wise]``, registered on first use; None for a name without ``+``.

    ``TASK`` is a task objective (``ce``, ``contrastive``) or a method that is one alone
    (``ft``, ``flyp``); each ``REG`` a regulariser; a final ``wise`` adds WiSE-FT's
    weight-space step. ``robustft methods`` lists the parts.

    Raises:
        ConfigError: An unknown part, naming the valid ones.
    """
    if "+" not in name:
        return None
    if name in _COMPOSED:
        return _COMPOSED[name]
    head, *parts = [part.strip() for part in name.split("+")]
    step = _WEIGHT_STEPS.get(parts[-1]) if parts else None
    regs = parts[:-1] if step is not None else parts
    bare = _bare_tasks()
    if head in TASKS:
        task = head
    elif head in bare:
        task = bare[head]
    else:
        raise ConfigError(f"method {name!r}: {head!r} is not a task objective; "
                          f"{choices_hint(head, sorted(TASKS) + sorted(bare))}")
    for reg in regs:
        if reg not in REGULARISERS:
            raise ConfigError(f"method {name!r}: {reg!r} is not a regulariser; "
                              f"{choices_hint(reg, sorted(REGULARISERS) + sorted(_WEIGHT_STEPS))}")
    if len(set(regs)) != len(regs):
        raise ConfigError(f"method {name!r} names a regulariser twice")
    what = " + ".join([task, *regs]) + (" then WiSE-FT" if step is not None else "")
    # Built once and cached, not listed: the registered names (and the errors that list them)
    # stay the same whatever compositions a process has used.
    _COMPOSED[name] = register_composition(name, f"{what} (composed from its name)", task=task, regularisers=regs,
                                           base=step or ComposedMethod, listed=False)
    return _COMPOSED[name]


METHODS.set_factory(compose)


def composable_parts() -> list[tuple[str, list[tuple[str, str]]]]:
    """The parts a ``TASK+REG[+REG...][+wise]`` name is made of, for ``robustft methods``.

    Returns:
        ``[(heading, [(name, description), ...]), ...]``: the task objectives (each naming
        the methods that stand for it alone, ``ft`` for ``ce``), the regularisers, and the
        weight-space steps (last in a name, optional).
    """
    bare = _bare_tasks()
    tasks = []
    for key, cls in TASKS.items():
        aliases = sorted(name for name, task in bare.items() if task == key)
        also = f" (also written {', '.join(aliases)})" if aliases else ""
        tasks.append((key, cls.description + also))
    return [
        ("task objectives (TASK)", tasks),
        ("regularisers (REG)", [(key, cls.description) for key, cls in REGULARISERS.items()]),
        ("weight-space steps (last, optional)", [(key, _WEIGHT_STEP_DESCRIPTIONS[key]) for key in _WEIGHT_STEPS]),
    ]


def trains(name: str) -> bool:
    """Whether the method ``name`` trains anything (False for the zero-shot classifier and unknown names)."""
    return name in METHODS and bool(METHODS.get(name).trains)


def with_weight_step(name: str) -> str:
    """The method name of ``name``'s result interpolated by WiSE-FT afterwards (``robustft wise`` rows).

    The registered composition that adds WiSE-FT to the same terms when there is one
    (``ft`` -> ``wise-ft``; an interpolating method keeps its name), else ``wise-ft+NAME``.
    """
    try:
        cls: type | None = METHODS.get(name)  # composes TASK+REG names on demand
    except ConfigError:
        cls = None
    if cls is None or not issubclass(cls, ComposedMethod) or cls.stage_names:
        return f"{_WISE_BASE}+{name}"
    if cls.interpolates:
        return name
    for other in METHODS.names():
        c = METHODS.get(other)
        if (issubclass(c, ComposedMethod) and c.interpolates and not c.stage_names and c.task == cls.task
                and c.regularisers == cls.regularisers and dict(c.task_options) == dict(cls.task_options)
                and "+" not in other):
            return other
    return f"{_WISE_BASE}+{name}"


_WISE_BASE = "wise-ft"
