"""The scorer registry of `mpm eval`: every metric is a scorer, found by name or as `package.module:Class`.

Two kinds:
    TextScorer   scores model outputs (captions, answers) of ONE language: `score(items, lang) -> Scores`, where each
                 item is a dict with `image`, `lang`, `output`, `references` (a list, possibly empty) and every extra
                 field of its data line (e.g. the miniature world's attributes)
    ImageJudge   scores generated images: `score(images, items, lang) -> Scores`, each item the prompt's dict
                 (`id`, `lang`, `prompt` and its extra fields)

`Scores` holds the aggregate values (`values`, e.g. {"cider": 0.91}), optionally one value per item (`per_item`,
same order as the items, None where an item could not be scored) and what a reader needs to reproduce them
(`details`, e.g. the tokenizer). A new scorer plugs in without editing eval code:

    from mpm.eval.scorers import TextScorer, Scores, register_scorer

    @register_scorer
    class ShoutRate(TextScorer):
        name = "shout_rate"
        def score(self, items, lang):
            shouts = [float(item["output"].isupper()) for item in items]
            return Scores({"shout_rate": sum(shouts) / max(len(shouts), 1)}, per_item=shouts)

and `mpm eval caption --metric shout_rate` (if its module is imported) or `--metric my_package.scorers:ShoutRate`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mpm.core.errors import ConfigError


@dataclass
class Scores:
    values: dict[str, float]  # aggregate metric values, e.g. {"cider": 0.91}
    per_item: list[float | None] | None = None  # one value per item (None: not scored), in the items' order
    details: dict[str, Any] = field(default_factory=dict)  # how they were computed (tokenizer, versions, counts)


class Scorer:
    name: ClassVar[str]  # the registry key (`--metric NAME`)
    kind: ClassVar[str]  # "text" | "image"

    def __init__(self, **options):
        """Options come from `metric_options.NAME.KEY=VALUE` overrides or the eval config (scorers without options ignore none:
        an unknown option is an error)."""
        if options:
            raise ConfigError(f"scorer {self.name!r} takes no options, got {sorted(options)}")


class TextScorer(Scorer):
    kind = "text"
    # The aggregate is the mean of the per-item values (CIDEr-D, accuracies): a subset's value (the in-language
    # outputs) is then the mean over the subset of values computed on the whole set (CIDEr's idf stays the whole
    # language's), not a new corpus score. False for corpus statistics such as BLEU, recomputed on the subset.
    mean_of_items: ClassVar[bool] = False

    def check(self, items: list[dict], lang: str) -> None:
        """Raise a UserError when these items cannot be scored in `lang` (references missing, a tokenizer made for
        another language): called before anything is generated, so a run does not fail after the model's work."""

    def score(self, items: list[dict], lang: str) -> Scores:
        raise NotImplementedError


class ImageJudge(Scorer):
    kind = "image"

    def score(self, images: list, items: list[dict], lang: str) -> Scores:
        raise NotImplementedError


SCORERS: dict[str, type[Scorer]] = {}


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: makes `--metric <cls.name>` find the class (in processes that imported its module)."""
    taken = SCORERS.get(cls.name)
    if taken is not None and taken is not cls:
        raise ValueError(f"scorer name {cls.name!r} is already registered by {taken.__module__}.{taken.__qualname__}")
    SCORERS[cls.name] = cls
    return cls


def scorer_class(name: str, kind: str | None = None) -> type[Scorer]:
    """The class `--metric NAME` stands for: a registered name (the built-in ones are imported first) or an import
    path "package.module:Class"; `kind` ("text" / "image") checks it is the kind the command needs."""
    import mpm.eval.builtin  # noqa: F401  (registers the built-in scorers)

    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"--metric {name!r} cannot be imported ({exc})") from None
    elif name in SCORERS:
        cls = SCORERS[name]
    else:
        raise ConfigError(f"--metric {name!r} is not a known scorer; known: {', '.join(sorted(SCORERS))} (or give "
                          "package.module:Class)")  # fmt: skip
    if not (isinstance(cls, type) and issubclass(cls, Scorer)):
        raise ConfigError(f"--metric {name!r} is not a subclass of mpm.eval.scorers.Scorer")
    if kind is not None and cls.kind != kind:
        raise ConfigError(f"--metric {name!r} scores {cls.kind}s, this command needs a {kind} scorer")
    return cls


def build_scorer(name: str, kind: str | None = None, **options) -> Scorer:
    cls = scorer_class(name, kind)
    try:
        return cls(**options)
    except TypeError as exc:
        raise ConfigError(f"--metric {name!r}: {exc}") from None
