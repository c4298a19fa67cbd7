"""The miniature world of `mpm demo`: rendered shape scenes, captions in several languages, and a strict parser.

Everything language-specific lives in `configs/world/<lang>.yaml`; this module has no per-language code path, so
adding a language is adding a file. A file holds:

    language: de                       # code; must match the file name
    name: Deutsch
    instruction: "Beschreibe auf Deutsch:"
    word_boundaries: true              # words must not touch letters of their own script (false for CJK)
    genders: [m, f, n]                 # [] for a language without grammatical gender
    colour: {red: {m: roter, f: rote, n: rotes, def: rote}, ...}   # a string, or forms per gender/variant
    size:   {big: {m: großer, ...}, small: ...}
    shape:  {circle: {word: Kreis, gender: m}, ...}
    position: {left: links, ...}
    words: {article: {m: ein, f: eine, n: ein}}                     # function words, usable as template slots
    conjunction: " und "               # joins per-object phrases (a template may override it)
    function_words: []                 # extra strings a tokenizer must keep whole
    templates:
      - object: "{article} {size} {colour} {shape} {position}"    # one object's phrase
        sentence: "{objects}"          # optional; the joined object phrases go in {objects}

A slot is an attribute (`colour`, `size`, `shape`, `position`) or a `words` entry, with an optional variant:
`{colour.def}` takes the form `def.<gender>` of the object's noun gender, else `def`. A plain `{colour}` takes
the form `<gender>`. A string entry is the same for every gender and variant.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mpm.core.config import parse_yaml
from mpm.core.errors import ConfigError

DEFAULT_FOLDER = Path(__file__).resolve().parents[2] / "configs" / "world"

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 170, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 210, 30),
    "purple": (140, 50, 185),
    "orange": (245, 135, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = ("big", "small")
POSITIONS = ("left", "right", "top", "bottom")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": SIZES,
    "position": POSITIONS,
}
_CENTRES = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72)}
_RADII = {"big": 0.2, "small": 0.11}  # fraction of the image side
_NO_GENDER = ""


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    position: str

    def attributes(self) -> dict[str, str]:
        return {"colour": self.colour, "shape": self.shape, "size": self.size, "position": self.position}


@dataclass(frozen=True)
class Scene:
    """Objects plus the seed of the render's jitter and noise: a Scene renders to the same image every time."""

    objects: tuple[SceneObject, ...]
    seed: int = 0

    def attributes(self) -> dict[str, str]:
        """The attributes of a one-object scene."""
        if len(self.objects) != 1:
            raise ValueError(f"attributes() needs a one-object scene, this one has {len(self.objects)}")
        return self.objects[0].attributes()


def _pick(rng: Any, n: int) -> int:
    """An index in range(n) from a numpy Generator or a random.Random (both have .random())."""
    return min(int(rng.random() * n), n - 1)


def _script(ch: str) -> str:
    try:
        return unicodedata.name(ch).split()[0]
    except ValueError:
        return ""


@dataclass
class Language:
    """One parsed `configs/world/<lang>.yaml`."""

    code: str
    name: str
    instruction: str
    word_boundaries: bool
    genders: tuple[str, ...]
    entries: dict[str, dict[str, Any]]  # attribute -> value -> str | {form key: str}
    nouns: dict[str, tuple[str, str]]  # shape -> (word, gender)
    words: dict[str, Any]
    templates: list[dict[str, str]]
    conjunction: str
    function_words: tuple[str, ...]
    path: str
    forms: dict[str, tuple[str, str]] = field(default_factory=dict)  # casefolded form -> (attribute, value)

    def form(self, slot: str, gender: str, obj: SceneObject | None = None, key: str = "") -> str:
        """The word for template slot `slot` (e.g. "colour.def") for a noun of `gender`."""
        name, _, variant = slot.partition(".")
        if name == "shape":
            if obj is None:
                raise ValueError("a shape slot needs an object")
            return self.nouns[obj.shape][0]
        if name in ATTRIBUTES:
            if obj is None:
                raise ValueError(f"a {name} slot needs an object")
            value = getattr(obj, name)
            entry, where = self.entries[name][value], f"{name}.{value}"
        elif name in self.words:
            entry, where = self.words[name], f"words.{name}"
        else:
            raise ConfigError(f"{self.path}: {key or 'template'} has slot {{{slot}}} with no filler")
        return _resolve(entry, variant, gender, f"{self.path}: {where}", key)


def _resolve(entry: Any, variant: str, gender: str, where: str, key: str = "") -> str:
    if isinstance(entry, str):
        return entry
    candidates = [f"{variant}.{gender}", variant] if variant else [gender]
    for c in candidates:
        if c and c in entry:
            return entry[c]
    used = f" (used by {key})" if key else ""
    want = " or ".join(repr(c) for c in candidates if c)
    raise ConfigError(f"{where} has no form {want}{used}")


def _slots(template: str, where: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ConfigError(f"{where}: bad template {template!r}: {e}") from None


def _fill(template: str, values: Mapping[str, str]) -> str:
    return "".join(lit + (values[f] if f is not None else "") for lit, f, _, _ in string.Formatter().parse(template))


def load_language(path: str | Path) -> Language:
    """Parse and validate one world file; any error is a ConfigError naming the file and key."""
    path = Path(path)
    p = str(path)
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the world file: {e}") from None
    except Exception as e:  # yaml errors
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a world file must be a mapping")

    def need(key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in data:
            if default is ...:
                raise ConfigError(f"{p}: missing key '{key}'")
            return default
        if not isinstance(data[key], kind):
            raise ConfigError(f"{p}: key '{key}' must be {getattr(kind, '__name__', kind)}, got {data[key]!r}")
        return data[key]

    code = str(need("language", str))
    if code != path.stem:
        raise ConfigError(f"{p}: key 'language' is {code!r} but the file is named {path.name}")
    genders = tuple(str(g) for g in need("genders", list, []))
    entries: dict[str, dict[str, Any]] = {}
    for attr, values in ATTRIBUTES.items():
        table = need(attr, dict)
        unknown = sorted(set(table) - set(values))
        if unknown:
            raise ConfigError(f"{p}: key '{attr}' has unknown values {unknown}; known: {list(values)}")
        for v in values:
            if v not in table or table[v] in (None, "", {}):
                raise ConfigError(f"{p}: missing attribute word '{attr}.{v}'")
            entry = table[v]
            if attr == "shape":
                if not isinstance(entry, dict) or not isinstance(entry.get("word"), str):
                    raise ConfigError(f"{p}: key 'shape.{v}' must be {{word: ..., gender: ...}}")
                g = entry.get("gender", _NO_GENDER) or _NO_GENDER
                if g != _NO_GENDER and str(g) not in genders:
                    raise ConfigError(f"{p}: key 'shape.{v}.gender' is {g!r}, not one of genders {list(genders)}")
                if g == _NO_GENDER and genders:
                    raise ConfigError(f"{p}: key 'shape.{v}' has no gender; this language has {list(genders)}")
            elif not isinstance(entry, str | dict) or (
                isinstance(entry, dict) and not all(isinstance(x, str) and x for x in entry.values())
            ):
                raise ConfigError(f"{p}: key '{attr}.{v}' must be a word or a mapping of forms to words")
        entries[attr] = dict(table)
    nouns = {s: (entries["shape"][s]["word"], str(entries["shape"][s].get("gender") or _NO_GENDER)) for s in SHAPES}
    words = dict(need("words", dict, {}))
    for w, entry in words.items():
        if w in ATTRIBUTES or not isinstance(entry, str | dict):
            raise ConfigError(f"{p}: key 'words.{w}' must be a non-attribute name with a word or forms")
    raw_templates = need("templates", list)
    if not raw_templates:
        raise ConfigError(f"{p}: key 'templates' is empty")
    conjunction = str(need("conjunction", str, " "))
    templates = []
    for i, t in enumerate(raw_templates):
        if isinstance(t, str):
            t = {"object": t}
        if not isinstance(t, dict) or not isinstance(t.get("object"), str):
            raise ConfigError(f"{p}: key 'templates[{i}]' needs an 'object' string")
        extra = sorted(set(t) - {"object", "sentence", "conjunction"})
        if extra:
            raise ConfigError(f"{p}: key 'templates[{i}]' has unknown keys {extra}")
        tpl = {
            "object": t["object"],
            "sentence": str(t.get("sentence", "{objects}")),
            "conjunction": str(t.get("conjunction", conjunction)),
        }
        if _slots(tpl["sentence"], f"{p}: templates[{i}].sentence") != ["objects"]:
            raise ConfigError(f"{p}: key 'templates[{i}].sentence' must have exactly one slot {{objects}}")
        templates.append(tpl)
    lang = Language(
        code=code,
        name=str(need("name", str, code)),
        instruction=str(need("instruction", str)),
        word_boundaries=bool(need("word_boundaries", bool, True)),
        genders=genders,
        entries=entries,
        nouns=nouns,
        words=words,
        templates=templates,
        conjunction=conjunction,
        function_words=tuple(str(w) for w in need("function_words", list, [])),
        path=p,
    )
    # every slot of every template resolves for every noun gender (catches missing agreement forms at load)
    for i, tpl in enumerate(templates):
        key = f"templates[{i}].object"
        slots = _slots(tpl["object"], f"{p}: {key}")
        for slot in slots:
            if slot.partition(".")[0] not in (*ATTRIBUTES, *words):
                raise ConfigError(f"{p}: key '{key}' has slot {{{slot}}} with no filler (not an attribute or words.*)")
        missing = [a for a in ATTRIBUTES if a not in {s.partition(".")[0] for s in slots}]
        if missing:
            raise ConfigError(f"{p}: key '{key}' has no slot for {missing}; a caption must name every attribute")
        for slot in slots:
            attr = slot.partition(".")[0]
            for shape, (_, gender) in nouns.items():
                for value in ATTRIBUTES.get(attr, ("red",)):
                    obj = SceneObject(colour="red", shape=shape, size="big", position="left")
                    if attr in ATTRIBUTES:
                        obj = SceneObject(**{**obj.attributes(), attr: value})
                    lang.form(slot, gender, obj, key=key)
    # the parse lexicon: every form of every attribute word; a form must mean one value only
    for attr in ATTRIBUTES:
        for value in ATTRIBUTES[attr]:
            entry = entries[attr][value]
            forms = [entry["word"]] if attr == "shape" else [entry] if isinstance(entry, str) else entry.values()
            for f in forms:
                k = f.casefold()
                if k in lang.forms and lang.forms[k] != (attr, value):
                    raise ConfigError(
                        f"{p}: key '{attr}.{value}': the word {f!r} is also a form of '{lang.forms[k][0]}.{lang.forms[k][1]}'"
                    )
                lang.forms[k] = (attr, value)
    return lang


class World:
    """Languages loaded from world files, plus the renderer, captioner and parser that use them."""

    def __init__(self, languages: Mapping[str, Language]):
        self.langs = dict(languages)
        self._union: dict[str, tuple[str, str]] = {}
        owner: dict[str, str] = {}
        for code, lang in self.langs.items():
            for f, av in lang.forms.items():
                if f in self._union and self._union[f] != av:
                    raise ConfigError(
                        f"{lang.path}: the word {f!r} means {av[0]}={av[1]} but in {owner[f]} it means "
                        f"{self._union[f][0]}={self._union[f][1]}; parsing code-switched text would be ambiguous"
                    )
                self._union[f] = av
                owner.setdefault(f, code)
        self._segments = {code: self._segmentation(lang) for code, lang in self.langs.items()}
        # words of space-separated languages must match as whole words
        self._spaced = {w.casefold() for c, ws in self._segments.items() if self.langs[c].word_boundaries for w in ws}

    @property
    def languages(self) -> list[str]:
        return list(self.langs)

    def _lang(self, lang: str) -> Language:
        if lang not in self.langs:
            raise ConfigError(f"unknown world language {lang!r}; loaded: {self.languages}")
        return self.langs[lang]

    def instruction(self, lang: str) -> str:
        return self._lang(lang).instruction

    # ---- scenes and rendering -------------------------------------------------------------------------------

    def sample_scene(self, rng: Any, objects: int = 1) -> Scene:
        """A random scene; objects take distinct positions (so at most 4)."""
        if not 1 <= objects <= len(POSITIONS):
            raise ValueError(f"objects must be in 1..{len(POSITIONS)}, got {objects}")
        free = list(POSITIONS)
        objs = []
        for _ in range(objects):
            pos = free.pop(_pick(rng, len(free)))
            objs.append(
                SceneObject(
                    colour=ATTRIBUTES["colour"][_pick(rng, len(COLOURS))],
                    shape=SHAPES[_pick(rng, len(SHAPES))],
                    size=SIZES[_pick(rng, len(SIZES))],
                    position=pos,
                )
            )
        return Scene(objects=tuple(objs), seed=_pick(rng, 2**31))

    def scene(self, index: int, seed: int = 0, objects: int = 1) -> Scene:
        """Scene number `index` of the stream for `seed`: deterministic, independent of other indices."""
        return self.sample_scene(np.random.default_rng([seed, index]), objects=objects)

    def render(self, scene: Scene, size: int = 64, noise: float = 6.0) -> Image.Image:
        """An RGB image of `scene`, `size` x `size`; jitter and noise come from `scene.seed`."""
        rng = np.random.default_rng(scene.seed)
        s = 4 * size  # draw supersampled, then downsample (antialiasing)
        tint = rng.integers(-18, 19, size=3)
        grey = int(rng.integers(195, 236))
        bg = tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
        img = Image.new("RGB", (s, s), bg)
        draw = ImageDraw.Draw(img)
        for obj in scene.objects:
            colour = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[obj.colour])
            cx, cy = (c + rng.uniform(-0.05, 0.05) for c in _CENTRES[obj.position])
            r = _RADII[obj.size] * rng.uniform(0.85, 1.15)
            _draw_shape(draw, obj.shape, cx * s, cy * s, r * s, colour)
        arr = np.asarray(img.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)
        if noise:
            arr = arr + rng.normal(0.0, noise, size=arr.shape)
        return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "RGB")

    # ---- captions ---------------------------------------------------------------------------------------------

    def caption(
        self,
        scene: Scene,
        lang: str,
        rng: Any = None,
        template: int | None = None,
        switch_to: str | None = None,
        p: float = 0.4,
    ) -> str:
        """A caption of `scene` in `lang`, with template `template` (else one drawn from `rng`).

        With `switch_to`, each attribute word is replaced with probability `p` by its form in that language
        (agreeing with that language's noun for the object's shape), inside the base-language template.
        """
        base = self._lang(lang)
        other = self._lang(switch_to) if switch_to else None
        if rng is None:
            rng = np.random.default_rng(scene.seed)
        if template is None:
            template = _pick(rng, len(base.templates))
        tpl = base.templates[template]
        phrases = []
        for obj in scene.objects:
            gender = base.nouns[obj.shape][1]
            values = {}
            for slot in _slots(tpl["object"], base.path):
                name = slot.partition(".")[0]
                if other is not None and name in ATTRIBUTES and rng.random() < p:
                    values[slot] = other.form(name, other.nouns[obj.shape][1], obj)
                else:
                    values[slot] = base.form(slot, gender, obj)
            phrases.append(self._join(tpl["object"], values))
        return tpl["sentence"].replace("{objects}", tpl["conjunction"].join(phrases))

    def _join(self, template: str, values: Mapping[str, str]) -> str:
        """Fill `template`; a word of a space-separated language that would run into letters of its own script
        (a switched word inside a CJK template) gets a space, so that it stays a whole word."""
        out, prev_spaced = "", False
        for literal, slot, _, _ in string.Formatter().parse(template):
            for piece, spaced in ((literal, False), (values[slot] if slot is not None else "", True)):
                if not piece:
                    continue
                spaced = spaced and piece.casefold() in self._spaced
                glued = out and out[-1].isalnum() and piece[0].isalnum() and _script(out[-1]) == _script(piece[0])
                if glued and (spaced or prev_spaced):
                    out += " "
                out, prev_spaced = out + piece, spaced
        return out

    # ---- parsing ---------------------------------------------------------------------------------------------

    def _codes(self, lang: str | Sequence[str] | None) -> list[str]:
        if lang is None:
            return self.languages
        codes = [lang] if isinstance(lang, str) else list(lang)
        for c in codes:
            self._lang(c)
        return codes

    def _tokens(self, text: str, lexicon: Mapping[str, Any]) -> list[str]:
        """Longest-match-first scan of `text` (casefolded) for words of `lexicon`; returns the matched words."""
        low = text.casefold()
        by_first: dict[str, list[str]] = {}
        for w in sorted(lexicon, key=len, reverse=True):
            by_first.setdefault(w[0], []).append(w)
        found, i = [], 0
        while i < len(low):
            for w in by_first.get(low[i], ()):
                if low.startswith(w, i) and _bounded(low, i, i + len(w), w in self._spaced):
                    found.append(w)
                    i += len(w)
                    break
            else:
                i += 1
        return found

    def parse(self, text: str, lang: str | Sequence[str] | None) -> dict[str, Any]:
        """Attributes named in `text` with the lexicon of `lang` (a code, several codes, or None for all).

        Returns {colour, shape, size, position}: the first value mentioned, or None when none is; plus
        `conflicts`, the attributes mentioned with more than one value, and `mentions`, every value in order.
        """
        codes = self._codes(lang)
        lexicon: dict[str, tuple[str, str]] = {}
        for c in codes:
            lexicon.update(self.langs[c].forms)
        mentions: dict[str, list[str]] = {a: [] for a in ATTRIBUTES}
        for w in self._tokens(text, lexicon):
            attr, value = lexicon[w]
            mentions[attr].append(value)
        out: dict[str, Any] = {a: (m[0] if m else None) for a, m in mentions.items()}
        out["conflicts"] = sorted(a for a, m in mentions.items() if len(set(m)) > 1)
        out["mentions"] = mentions
        return out

    def purity(self, text: str, lang: str) -> float:
        """Share of world-lexicon tokens in `text` that belong to `lang` (words shared by several languages count
        for `lang` when it has them). Tokens are every language's segmentation words; 0.0 when there are none."""
        self._lang(lang)
        lexicon: dict[str, set[str]] = {}
        for c, words in self._segments.items():
            for w in words:
                lexicon.setdefault(w.casefold(), set()).add(c)
        tokens = self._tokens(text, lexicon)
        if not tokens:
            return 0.0
        return sum(lang in lexicon[t] for t in tokens) / len(tokens)

    def _segmentation(self, lang: Language) -> list[str]:
        words: set[str] = set(lang.function_words)
        for attr in ATTRIBUTES:
            for entry in lang.entries[attr].values():
                if attr == "shape":
                    words.add(entry["word"])
                else:
                    words.update([entry] if isinstance(entry, str) else entry.values())
        for entry in lang.words.values():
            words.update([entry] if isinstance(entry, str) else entry.values())
        for tpl in lang.templates:
            for part in ("object", "sentence", "conjunction"):
                text = tpl[part] if part == "conjunction" else _fill(tpl[part], _Blank())
                chunks = re.split(r"[\s\x00]+", text)
                words.update(c for c in chunks if c)
        words.discard("")
        return sorted(words, key=lambda w: (-len(w), w))

    lexicon_purity = purity

    def segmentation_words(self, lang: str) -> list[str]:
        """Words of `lang` a tokenizer must keep whole (lexicon forms, function words, template literals),
        longest first."""
        self._lang(lang)
        return list(self._segments[lang])


class _Blank(dict):
    """Fills every slot with a separator, so that template literals come out as separate chunks."""

    def __missing__(self, key: str) -> str:
        return "\x00"


def _bounded(text: str, start: int, end: int, spaced: bool) -> bool:
    """A word found at text[start:end] is a whole word: it does not run into letters of the same script."""
    if not spaced:
        return True
    before = text[start - 1] if start > 0 else ""
    after = text[end] if end < len(text) else ""
    if before and before.isalnum() and _script(before) == _script(text[start]):
        return False
    return not (after and after.isalnum() and _script(after) == _script(text[end - 1]))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        pts = [(cx + r * np.cos(a), cy - r * np.sin(a)) for a in np.pi / 2 + np.arange(3) * 2 * np.pi / 3]
        draw.polygon(pts, fill=fill)
    elif shape == "star":
        pts = []
        for k in range(10):
            a = np.pi / 2 + k * np.pi / 5
            rr = r if k % 2 == 0 else r * 0.42
            pts.append((cx + rr * np.cos(a), cy - rr * np.sin(a)))
        draw.polygon(pts, fill=fill)
    elif shape == "cross":
        w = r * 0.33
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def load_world(langs: Sequence[str] | None = None, folder: str | Path | None = None) -> World:
    """Load `<folder>/<lang>.yaml` for each of `langs` (default: every .yaml in the folder)."""
    folder = Path(folder) if folder is not None else DEFAULT_FOLDER
    if langs is None:
        paths = sorted(folder.glob("*.yaml"))
        if not paths:
            raise ConfigError(f"{folder}: no world files (<lang>.yaml)")
    else:
        paths = [folder / f"{c}.yaml" for c in langs]
    return World({p.stem: load_language(p) for p in paths})


def segmentation_words(lang: str, folder: str | Path | None = None) -> list[str]:
    """The words of `lang` that a tokenizer must keep whole (see `World.segmentation_words`)."""
    return load_world([lang], folder).segmentation_words(lang)
