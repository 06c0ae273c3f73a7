"""What a manifest.json holds: its fields, their types and ranges, and its checksum.

This is the one place that says which fields a manifest has. `trajectory.read_manifest` checks
every manifest against it before anything reads a field, so that a value of the wrong type or out
of range is one line naming the field (``optimizer.momentum must be a number in [0, 1], got
"0.9"``), never a traceback deep in replay. ``problems`` lists every such problem; `plgk check`
prints them all.

From format version 4 on, `trajectory.write_manifest` stores ``checksum``: ``sha256:`` and the
hex sha256 of the canonical JSON (sorted keys, no spaces) of every other key, recomputed on each
write. A manifest edited by hand (an optimizer value, the steps per epoch) would otherwise pass
every check and replay into a wrong result. It is not a signature: whoever recomputes it can
change the manifest, and the schema is what then keeps replay from tracebacks.
"""

from __future__ import annotations

import hashlib
import json
import math

from plgk_cli.config import OPTIMIZERS, config_from_dict
from plgk_cli.errors import TrajectoryError

CHECKSUM = "checksum"
CHECKSUM_KIND = "sha256"
CHECKSUM_VERSION = 4  # the first format version whose manifests carry the checksum
DTYPES = ("float32", "float64")
ADVICE = "restore it or re-run `plgk train`"
SHOWN_CHARS = 40  # of a wrong value, in a message


# --------------------------------------------------------------------------- checksum


def canonical(manifest: dict) -> str:
    """The JSON the checksum is taken over: every key but the checksum, sorted, no spaces."""
    return json.dumps({k: v for k, v in manifest.items() if k != CHECKSUM}, sort_keys=True,
                      separators=(",", ":"))


def content_checksum(manifest: dict) -> str:
    return f"{CHECKSUM_KIND}:{hashlib.sha256(canonical(manifest).encode()).hexdigest()}"


def with_checksum(manifest: dict) -> dict:
    """``manifest`` as it reads back from JSON (tuples become lists, keys strings), with the
    checksum of that content; a checksum it carried (a dict read from an older write) is dropped
    first, never written again over changed content."""
    content = json.loads(json.dumps({k: v for k, v in manifest.items() if k != CHECKSUM}))
    return {**content, CHECKSUM: content_checksum(content)}


def checksum_problem(manifest: dict) -> str | None:
    """Why the manifest's checksum does not vouch for its content, or None. A manifest of format
    version 4 or later must carry one; older ones carry none, and one they carry is verified too
    (an edit that lowered the version keeps the checksum of the original content)."""
    recorded = manifest.get(CHECKSUM)
    changed = f"the manifest was changed after plgk wrote it: {ADVICE}"
    if recorded is None:
        if manifest.get("format_version", 0) >= CHECKSUM_VERSION:
            return (f"no {CHECKSUM}, though every manifest of format version {CHECKSUM_VERSION} or later "
                    f"carries one; {changed}")
        return None
    if not isinstance(recorded, str) or not recorded.startswith(CHECKSUM_KIND + ":"):
        return f"{CHECKSUM} {_shown(recorded)} is not a {CHECKSUM_KIND} checksum of plgk's; {changed}"
    if recorded != content_checksum(manifest):
        return (f"{CHECKSUM} mismatch: the manifest was changed after plgk wrote it; plgk cannot "
                f"replay a run whose manifest does not describe it: {ADVICE}")
    return None


# --------------------------------------------------------------------------- schema


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


class Integer:
    def __init__(self, low: int):
        self.low = low
        self.expected, self.many = f"an integer >= {low}", f"integers >= {low}"

    def accepts(self, value) -> bool:
        return _is_int(value) and value >= self.low


class Number:
    """A finite number in [low, high] (``high_open``: [low, high)), or >= low where high is None."""

    def __init__(self, low: float, high: float | None = None, high_open: bool = False):
        self.low, self.high, self.high_open = low, high, high_open
        if high is None:  # a bounded range says finite by itself
            self.expected, self.many = f"a finite number >= {low:g}", f"finite numbers >= {low:g}"
        else:
            bounds = f"in [{low:g}, {high:g}{')' if high_open else ']'}"
            self.expected, self.many = f"a number {bounds}", f"numbers {bounds}"

    def accepts(self, value) -> bool:
        if not _is_number(value) or value < self.low:
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


class Positive:
    expected, many = "a finite number > 0", "finite numbers > 0"

    def accepts(self, value) -> bool:
        return _is_number(value) and value > 0


class Text:
    """A non-empty string, or one of ``choices``."""

    def __init__(self, choices: tuple = ()):
        self.choices = choices
        listed = ", ".join(json.dumps(c) for c in choices)
        self.expected = f"one of {listed}" if choices else "a non-empty string"
        self.many = f"strings among {listed}" if choices else "non-empty strings"

    def accepts(self, value) -> bool:
        return isinstance(value, str) and (value in self.choices if self.choices else bool(value))


class Boolean:
    expected, many = "true or false", "booleans"

    def accepts(self, value) -> bool:
        return isinstance(value, bool)


class AnyObject:
    expected, many = "an object", "objects"

    def accepts(self, value) -> bool:
        return isinstance(value, dict)


class Config:
    """`plgk train`'s configuration (Run.config rebuilds it), or null for a loop of your own."""

    expected = "null or a `plgk train` configuration (an object of its sections)"

    def accepts(self, value) -> bool:
        if value is None:
            return True
        try:
            config_from_dict(value)
        except (TypeError, ValueError, KeyError, AttributeError):
            return False
        return True


class Nullable:
    def __init__(self, kind):
        self.kind, self.expected = kind, f"null or {kind.expected}"

    def accepts(self, value) -> bool:
        return value is None or self.kind.accepts(value)


class OneOf:
    def __init__(self, *kinds):
        self.kinds = kinds
        self.expected = " or ".join(k.expected for k in kinds)

    def accepts(self, value) -> bool:
        return any(k.accepts(value) for k in self.kinds)


class List:
    """A list of ``item``: of exactly ``length`` items, or of at least ``least``."""

    def __init__(self, item, length: int | None = None, least: int = 0):
        self.item, self.length, self.least = item, length, least
        size = f" of {length}" if length is not None else " (non-empty) of" if least else " of"
        self.expected = f"a list{size} {item.many}"

    def accepts(self, value) -> bool:
        return isinstance(value, list) and len(value) >= self.least and (
            self.length is None or len(value) == self.length)


class Field:
    """A field of an Object: its kind, and since which format version every manifest has it
    (None: optional in every version); ``when_complete``: required only once complete."""

    def __init__(self, kind, since: int | None = 1, when_complete: bool = False):
        self.kind, self.since, self.when_complete = kind, since, when_complete

    def required(self, version: int, complete: bool) -> bool:
        return self.since is not None and version >= self.since and (complete or not self.when_complete)


class Object:
    expected, many = "an object", "objects"

    def __init__(self, **fields: Field):
        self.fields = fields

    def accepts(self, value) -> bool:
        return isinstance(value, dict)


V4 = CHECKSUM_VERSION  # fields every manifest this plgk writes has, though older ones may not

GROUP = Object(
    params=Field(List(Text())), lr=Field(Number(0)), momentum=Field(Number(0, 1)),
    dampening=Field(Number(0, 1)), beta1=Field(Number(0, 1, high_open=True)),
    beta2=Field(Number(0, 1, high_open=True)), eps=Field(Number(0)), alpha=Field(Number(0, 1)),
    weight_decay=Field(Number(0)))

MANIFEST = Object(
    run_id=Field(Text()),
    plgk_version=Field(Text(), since=V4),
    recorded_by=Field(Text(), since=None),  # absent: told by the config (trajectory.recorded_by)
    created=Field(Text(), since=V4),
    config=Field(Config()),
    dataset=Field(Object(
        spec=Field(Text()), seed=Field(Integer(0)), fingerprint=Field(Text()),
        num_train=Field(Integer(1)), num_test=Field(Integer(0)), num_classes=Field(Integer(1)),
        in_shape=Field(List(Integer(1))))),
    model=Field(Object(name=Field(Text()), kwargs=Field(AnyObject()))),
    task=Field(Object(name=Field(Text())), since=2),
    loss=Field(Text(), since=V4),
    optimizer=Field(Object(
        name=Field(Text(OPTIMIZERS)), lr=Field(Number(0), since=V4),
        momentum=Field(Number(0, 1), since=V4), dampening=Field(Number(0, 1), since=V4),
        nesterov=Field(Boolean(), since=V4),
        betas=Field(List(Number(0, 1, high_open=True), length=2), since=V4),
        eps=Field(Number(0), since=V4), alpha=Field(Number(0, 1), since=V4),
        weight_decay=Field(Number(0), since=V4), amsgrad=Field(Boolean(), since=V4),
        centered=Field(Boolean(), since=V4),
        clip_grad_norm=Field(Nullable(OneOf(Positive(), List(Positive(), least=1))), since=V4),
        groups=Field(List(GROUP, least=1), since=3),
        frozen=Field(List(Text()), since=None))),
    schedule=Field(Nullable(AnyObject()), since=V4),
    parameters=Field(List(Object(name=Field(Text()), shape=Field(List(Integer(0))),
                                 dtype=Field(Text(DTYPES))), least=1)),
    dtype=Field(Text(DTYPES)),
    device=Field(Text(), since=V4),
    batch_size=Field(Integer(1), since=V4),
    epochs=Field(Integer(1), since=V4),
    steps_per_epoch=Field(Integer(1)),
    total_steps=Field(Integer(0)),
    checkpoint_every=Field(Integer(1), since=V4),
    complete=Field(Boolean(), since=V4),
    final=Field(AnyObject(), since=V4, when_complete=True),
    forward=Field(Object(random=Field(Boolean()), buffers=Field(List(Text()))), since=2,
                  when_complete=True),
    # recorded with allow_nonfinite: the first update whose loss, gradients or parameters were not
    # finite (recorder.NONFINITE); absent in a run whose every update was finite
    nonfinite=Field(Object(first_step=Field(Integer(1))), since=None),
)


def _walk(kind, value, path: str, version: int, complete: bool, out: list) -> None:
    if not kind.accepts(value):
        out.append(f"{path} must be {kind.expected}, got {_shown(value)}")
        return
    if isinstance(kind, List):
        for i, item in enumerate(value):
            _walk(kind.item, item, f"{path}[{i}]", version, complete, out)
    elif isinstance(kind, Object):
        for name, field in kind.fields.items():
            where = f"{path}.{name}" if path else name
            if name in value:
                _walk(field.kind, value[name], where, version, complete, out)
            elif field.required(version, complete) and path:
                out.append(f"{where} is missing")


def _relations(manifest: dict) -> list:
    """What holds between fields (each well-typed): the Recorder writes them so, replay needs it."""
    out = []
    names = [p["name"] for p in manifest["parameters"]]
    seen = set()
    for i, p in enumerate(manifest["parameters"]):
        if p["name"] in seen:
            out.append(f"parameters[{i}].name {_shown(p['name'])} names a parameter listed before it")
        seen.add(p["name"])
        if p["dtype"] != manifest["dtype"]:
            out.append(f"parameters[{i}].dtype must be the run's dtype {_shown(manifest['dtype'])}, "
                       f"got {_shown(p['dtype'])}")
    optimizer = manifest["optimizer"]
    if "groups" in optimizer:
        held = [name for group in optimizer["groups"] for name in group["params"]]
        for g, group in enumerate(optimizer["groups"]):
            for i, name in enumerate(group["params"]):
                if name not in seen:
                    out.append(f"optimizer.groups[{g}].params[{i}] must name a recorded parameter, got "
                               f"{_shown(name)}")
        for name in dict.fromkeys(names):
            if held.count(name) != 1:
                out.append(f"optimizer.groups must hold every recorded parameter once, "
                           f"{_shown(name)} is in {held.count(name)}")
    for i, name in enumerate(optimizer.get("frozen", ())):
        if name not in seen:
            out.append(f"optimizer.frozen[{i}] must name a recorded parameter, got {_shown(name)}")
    if manifest.get("complete") and manifest["total_steps"] < 1:
        out.append(f"total_steps must be >= 1 in a complete run, got {manifest['total_steps']}")
    return out


def problems(manifest: dict) -> list[str]:
    """Every way ``manifest`` (a JSON object of a readable format version) differs from what plgk
    writes: each names the field and what was expected. Empty when it is fit to read."""
    version = manifest["format_version"]
    complete = manifest.get("complete") is True
    missing = [name for name, field in MANIFEST.fields.items()
               if field.required(version, complete) and name not in manifest]
    if missing:
        return [f"manifest lacks {', '.join(missing)}"]
    out: list = []
    _walk(MANIFEST, manifest, "", version, complete, out)
    return out or _relations(manifest)


class ManifestError(TrajectoryError):
    """A manifest whose fields are not what plgk writes; ``lines``: one message per problem (what
    `plgk check` prints), the exception's own message is the first, with the count of the rest."""

    def __init__(self, path, found: list):
        self.lines = [f"{path}: {p}; {ADVICE}" for p in found]
        more = len(found) - 1
        hint = f" (and {more} more problem{'s' if more > 1 else ''}: run `plgk check`)" if more else ""
        super().__init__(self.lines[0] + hint)


def check(manifest: dict, path) -> None:
    """Raise ManifestError, naming ``path``, unless ``manifest`` is fit to read."""
    found = problems(manifest)
    if found:
        raise ManifestError(path, found)
