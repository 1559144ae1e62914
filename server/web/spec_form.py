"""The submit form, built from the job spec's JSON schema and the model/dataset registries.

`job_form()` walks the JSON schema of `JobSpec` (shared/spec.py) and turns it into
sections of fields and groups, so a new model, dataset, optimizer or spec field shows up
in the form without touching this module:

- a scalar becomes an input (numbers with min/max/step, enums as selects, booleans as
  checkboxes, string lists as comma-separated text), labelled, with the schema's
  description and range as help text;
- a discriminated union (kind, dataset, model, optimizer, schedule) becomes a selector
  plus one group per choice; properties every choice shares unchanged (a dataset's
  val_fraction, the common job fields) are rendered once, outside the groups;
- an optional object (loss, early_stopping) becomes a checkbox that switches a group on.

Every input is named by its dotted spec path ("model.params.hidden"), so the field
names in an ApiError map straight onto inputs. Inputs of different groups can share a
name (mlp and cnn both have "model.params.hidden"); each field's `when` chain says which
selector values make it the active one. The page's JS disables the inputs of inactive
groups, so only active values are sent; without JS every group is sent and
`values_from_form` takes each name's value by its position among the inputs of that
name (checkboxes carry their field id as their value, since unchecked ones send nothing).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Annotated, Any, Literal, Union

from pydantic import Field as SchemaField
from pydantic import TypeAdapter

from server.params import MAX_ID
from shared.dataset_catalog import DATASETS
from shared.model_catalog import MODELS
from shared.spec import EvaluateSpec, TrainSpec

# The kinds this form builds. A script job has a page of its own (server/web/script_submit.py):
# its code is a file to upload, its params a JSON object, neither a field of this walker.
FormSpec = Annotated[TrainSpec | EvaluateSpec, SchemaField(discriminator="kind")]

Widget = Literal["number", "text", "select", "checkbox", "radio", "list", "file", "column"]
ValueType = Literal[
    "integer", "number", "string", "boolean", "choice", "strings", "numbers", "file"
]
# A field's raw form value: text as typed, or a checkbox's state.
Raw = Union[str, bool]  # noqa: UP007
Condition = tuple[str, str]  # (selector field id, the value that activates)

# The first page a user sees must submit a good job as it stands (a CNN on digits).
DEFAULT_CHOICES = {"kind": "train", "dataset": "digits", "model": "cnn"}

# Labels where the property name alone reads badly; keyed by full dotted path, then by
# the last path segment. Anything else is the property name, humanized.
LABELS = {
    "kind": "Kind",
    "name": "Name",
    "dataset.name": "Dataset",
    "model.name": "Model",
    "optimizer.name": "Optimizer",
    "schedule.name": "Learning-rate schedule",
    "loss": "Choose the loss",
    "loss.name": "Loss",
    "early_stopping": "Stop early",
    "early_stopping.metric": "Watch metric",
    "resources.gpus": "GPUs",
    "resources.processes": "CPU processes (data-parallel)",
    "regularization.l1": "L1 penalty",
    "dataset.augment": "Augmentation (image data)",
    "dataset": "Dataset to score on",
    "dataset.split": "Split",
    "source_job_id": "Source job",
    "lr": "Learning rate",
    "lr_decay": "Learning-rate decay",
    "max_lr": "Peak learning rate",
    "min_lr_ratio": "Final learning-rate ratio",
    "pct_start": "Warm-up share",
    "max_runtime_s": "Max runtime (seconds)",
    "grad_clip_norm": "Gradient clip norm",
    "grad_accum_steps": "Gradient accumulation steps",
    "checkpoint_every_epochs": "Checkpoint every (epochs)",
    "val_fraction": "Validation fraction",
    "hflip": "Random horizontal flip",
    "crop_padding": "Random-crop padding (px)",
    "rotation_degrees": "Random rotation (degrees)",
    "d_model": "Model width (d_model)",
    "ff_dim": "Feed-forward width",
    "embedding_dim": "Embedding size",
    "batch_norm": "Batch normalization",
    "upload_id": "Upload id",
    "target": "Target column",
    "features": "Feature columns",
    "num_samples": "Samples",
    "num_classes": "Classes",
    "num_features": "Features",
    "seq_len": "Sequence length",
    "vocab_size": "Vocabulary size",
    "label_smoothing": "Label smoothing",
    "min_delta": "Min improvement",
    "betas": "Betas",
    "step_epochs": "Step every (epochs)",
    "warmup_epochs": "Warm-up epochs",
    "tags": "Tags",
    "seed": "Seed",
    "data_seed": "Data seed",
}
# Help text where the schema has none or says it for API users; keyed by dotted path.
HELP = {
    "name": "shown in the jobs list; optional",
    "tags": "comma-separated, e.g. baseline, digits",
    "priority": "higher runs first",
    "seed": "for reproducible runs",
    "dataset.split": "the part of the dataset to score on",
    "dataset.params.upload_id": "filled in when you choose a file; or an earlier upload's id",
    "file": "a UTF-8 CSV with a header row",
}
RADIO_LABELS = {"train": "Train a model", "evaluate": "Evaluate a trained model"}
# Select options where the value alone reads badly, keyed by the last path segment: the
# values' labels, and "" for what the unset (null) option means.
OPTION_LABELS = {
    "activation": {"": "none", "relu": "ReLU", "gelu": "GELU", "silu": "SiLU (swish)",
                   "leaky_relu": "Leaky ReLU"},
}  # fmt: skip

# Page sections: (id, title, kind it belongs to or None, collapsed, top-level spec keys).
# A spec key no section lists lands in the last section of its kind ("advanced" for
# train, "evaluate" for evaluate, "resources" for the shared ones).
SECTIONS: tuple[tuple[str, str, str | None, bool, tuple[str, ...]], ...] = (
    ("job", "Job", None, False, ("kind", "name", "tags")),
    ("data", "Data", "train", False, ("dataset",)),
    ("model", "Model", "train", False, ("model",)),
    ("training", "Training", "train", False, ("epochs", "batch_size", "seed", "optimizer", "schedule")),
    ("evaluate", "What to evaluate", "evaluate", False, ("source_job_id", "checkpoint", "dataset", "batch_size")),
    ("advanced", "Advanced training options", "train", True, ()),
    ("resources", "Resources and scheduling", None, False, ("resources", "priority", "max_runtime_s")),
)  # fmt: skip
LEFTOVER_SECTION = {"train": "advanced", "evaluate": "evaluate", None: "resources"}

# The evaluate spec's dataset is a free {name, params} pair, not a discriminated union;
# its choices (and each choice's params) come from this registry.
REGISTRY_CHOICES = {"dataset": DATASETS}
# Augmentation is for image data only (shared/spec.py refuses it otherwise): the page
# shows the group only while an image dataset is chosen.
IMAGE_ONLY_GROUPS = ("dataset.augment",)

_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class Option:
    value: str
    label: str
    data: tuple[tuple[str, str], ...] = ()  # data-* attributes for the page's JS


@dataclass(frozen=True)
class Field:
    id: str
    name: str  # the spec's dotted path: the input's name and the key of its errors
    label: str
    widget: Widget
    value_type: ValueType
    default: Raw
    help: str = ""
    nullable: bool = False
    when: tuple[Condition, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    step: str | None = None
    options: tuple[Option, ...] = ()
    choices: Mapping[str, Any] = field(default_factory=dict)  # option value -> JSON value
    max_length: int | None = None
    toggle: bool = False  # a checkbox that switches an optional object on
    selector: bool = False  # other fields' `when` refers to it
    upload_field: str | None = None  # file and column fields: the upload id input's id
    source_jobs: bool = False  # options are the user's succeeded train jobs

    @property
    def kind(self) -> str:
        return "field"


@dataclass(frozen=True)
class Group:
    id: str
    name: str  # dotted path: errors about the group as a whole land here
    legend: str
    description: str
    when: tuple[Condition, ...]
    children: tuple[Node, ...]
    local_when: Condition | None = None  # the condition this group adds to its parent's
    image_only: str | None = None  # the dataset selector's id, for image-only groups
    choice: bool = False  # one of a union's per-choice groups

    @property
    def kind(self) -> str:
        return "group"


Node = Union[Field, Group]  # noqa: UP007


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    when: tuple[Condition, ...]
    collapsed: bool
    children: tuple[Node, ...]


@dataclass(frozen=True)
class JobForm:
    sections: tuple[Section, ...]
    fields: tuple[Field, ...]  # every field in document order (selectors before dependents)
    groups: tuple[Group, ...]
    by_id: Mapping[str, Field]
    # Inputs sharing a name, in document order (checkboxes and files excluded: a checkbox
    # is found by its value, a file by request.files).
    siblings: Mapping[str, tuple[str, ...]]
    file_siblings: tuple[str, ...]
    order: Mapping[str, int]  # input and group ids -> position on the page


# ---------------------------------------------------------------- building


def humanize(path: str) -> str:
    if path in LABELS:
        return LABELS[path]
    last = path.rsplit(".", 1)[-1]
    if last in LABELS:
        return LABELS[last]
    return last.replace("_", " ").capitalize()


def _fmt(value: float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:,}" if isinstance(value, int) else repr(value)


def _range_text(s: Mapping[str, Any]) -> str:
    parts = []
    if "minimum" in s:
        parts.append(f"≥ {_fmt(s['minimum'])}")
    if "exclusiveMinimum" in s:
        parts.append(f"> {_fmt(s['exclusiveMinimum'])}")
    if "maximum" in s:
        parts.append(f"≤ {_fmt(s['maximum'])}")
    if "exclusiveMaximum" in s:
        parts.append(f"< {_fmt(s['exclusiveMaximum'])}")
    return ", ".join(parts)


def to_raw(value: Any) -> Raw:
    """A JSON value as an input shows it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)):
        return ", ".join(str(to_raw(v)) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


class _Builder:
    def __init__(self, schema: dict[str, Any]):
        self.defs: dict[str, Any] = schema.get("$defs", {})
        self.fields: list[Field] = []
        self.groups: list[Group] = []

    def resolve(self, s: Mapping[str, Any]) -> dict[str, Any]:
        while "$ref" in s:
            ref = s["$ref"]
            merged = {k: v for k, v in s.items() if k != "$ref"}
            s = {**self.defs[ref.rsplit("/", 1)[-1]], **merged}
        return dict(s)

    def split_nullable(self, s: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """(the non-null schema, whether null is allowed) for `X | None` properties."""
        options = s.get("anyOf")
        if options and any(o.get("type") == "null" for o in options):
            rest = [o for o in options if o.get("type") != "null"]
            if len(rest) == 1:
                inner = self.resolve(rest[0])
                for key in ("description", "default", "title"):
                    if key in s:
                        inner.setdefault(key, s[key])
                return inner, True
        return self.resolve(s), False

    # -- nodes

    def add(self, node: Field) -> Field:
        self.fields.append(node)
        return node

    def scalar(
        self, s: dict[str, Any], path: str, qual: list[str], when: tuple[Condition, ...],
        nullable: bool, default: Any,
    ) -> Field:  # fmt: skip
        fid = "f-" + "-".join(qual)
        description = s.get("description", "")
        help_parts = [HELP.get(path) or description]
        common: dict[str, Any] = dict(
            id=fid, name=path, label=humanize(path), nullable=nullable, when=when
        )
        if "enum" in s or "const" in s:
            values = s.get("enum") or [s["const"]]
            labels = OPTION_LABELS.get(path.rsplit(".", 1)[-1], {})
            options = tuple(Option(str(v), labels.get(str(v), str(v))) for v in values)
            if nullable:
                options = (Option("", labels.get("", "—")), *options)
            return self.add(
                Field(
                    **common, widget="select", value_type="choice", default=to_raw(default),
                    help=" ".join(p for p in help_parts if p), options=options,
                    choices={str(v): v for v in values},
                )
            )  # fmt: skip
        kind = s.get("type")
        if kind == "boolean" and nullable:
            # Three answers, not two: unset (None) means "decided elsewhere" (preemptible:
            # the queue's default), which an unchecked box would turn into False.
            return self.add(
                Field(
                    **common, widget="select", value_type="choice",
                    default="" if default is None else str(bool(default)).lower(),
                    help=description,
                    options=(Option("", "default"), Option("true", "yes"), Option("false", "no")),
                    choices={"true": True, "false": False},
                )
            )  # fmt: skip
        if kind == "boolean":
            return self.add(
                Field(
                    **common, widget="checkbox", value_type="boolean",
                    default=bool(default), help=description,
                )
            )  # fmt: skip
        if kind == "array":
            items = s.get("prefixItems") or [s.get("items", {})]
            numeric = all(self.resolve(i).get("type") in ("number", "integer") for i in items)
            text = help_parts[0]
            if "comma" not in text:
                hint = "comma-separated numbers" if numeric else "comma-separated"
                text = "; ".join(p for p in (text, hint) if p)
            return self.add(
                Field(
                    **common, widget="list", value_type="numbers" if numeric else "strings",
                    default=to_raw(default or []), help=text,
                )
            )  # fmt: skip
        if kind in ("integer", "number"):
            help_parts.append(_range_text(s))
            low = s.get("minimum", s.get("exclusiveMinimum"))
            high = s.get("maximum", s.get("exclusiveMaximum"))
            return self.add(
                Field(
                    **common, widget="number", value_type=kind, default=to_raw(default),
                    help="; ".join(p for p in help_parts if p), minimum=low, maximum=high,
                    step="1" if kind == "integer" else "any",
                )
            )  # fmt: skip
        return self.add(
            Field(
                **common, widget="text", value_type="string", default=to_raw(default),
                help="; ".join(p for p in help_parts if p), max_length=s.get("maxLength"),
            )
        )  # fmt: skip

    def prop(
        self, key: str, raw: Mapping[str, Any], path: str, qual: list[str],
        when: tuple[Condition, ...],
    ) -> list[Node]:  # fmt: skip
        """The nodes for one property of an object schema."""
        s, nullable = self.split_nullable(raw)
        default = s.get("default")
        if "discriminator" in s:
            return self.union(s, path, qual, when, selector_label=humanize(f"{path}.name"))
        is_object = s.get("type") == "object" or "properties" in s
        if is_object and not s.get("properties") and s.get("additionalProperties") is not False:
            return []  # free-form params: handled with their registry (see `registry_choice`)
        if is_object:
            if nullable:  # an optional object: a checkbox switches its group on
                toggle = self.add(
                    Field(
                        id="f-" + "-".join(qual), name=path, label=humanize(path),
                        widget="checkbox", value_type="boolean", default=default is not None,
                        help=s.get("description", ""), when=when, toggle=True, selector=True,
                    )
                )  # fmt: skip
                cond = (toggle.id, "true")
                children = self.object(s, path, qual, (*when, cond))
                group = Group(
                    "g-" + "-".join(qual), path, humanize(path), "", (*when, cond),
                    tuple(children), local_when=cond,
                )  # fmt: skip
                self.groups.append(group)
                return [toggle, group]
            children = self.object(s, path, qual, when)
            # Params flatten into their choice's group; so does a lone field.
            if key == "params" or len(children) <= 1:
                return children
            group = Group(
                "g-" + "-".join(qual), path, humanize(path), s.get("description", ""), when,
                tuple(children),
            )  # fmt: skip
            self.groups.append(group)
            return [group]
        # Three inputs need more than their schema says: the csv dataset's upload id (a
        # file input goes next to it), its target (a select of the upload's columns once
        # the upload is known) and an evaluation's source (a select of the user's jobs).
        if path == "dataset.params.upload_id":
            upload_id = "f-" + "-".join(qual)
            file = self.add(
                Field(
                    id="f-" + "-".join((*qual[:-1], "file")), name="file", label="CSV file",
                    widget="file", value_type="file", default="", help=HELP["file"],
                    when=when, upload_field=upload_id,
                )
            )  # fmt: skip
            return [file, self.scalar(s, path, qual, when, nullable, default)]
        if path == "dataset.params.target":
            upload = "f-" + "-".join((*qual[:-1], "upload_id"))
            column = replace(
                self.scalar(s, path, qual, when, nullable, default),
                widget="column", upload_field=upload,
            )  # fmt: skip
            self.fields[-1] = column
            return [column]
        if path == "source_job_id":
            jobs = replace(
                self.scalar(s, path, qual, when, nullable, default),
                widget="select", source_jobs=True, help="your succeeded train jobs",
            )  # fmt: skip
            self.fields[-1] = jobs
            return [jobs]
        return [self.scalar(s, path, qual, when, nullable, default)]

    def object(
        self, s: Mapping[str, Any], path: str, qual: list[str], when: tuple[Condition, ...],
        skip: str | None = None,
    ) -> list[Node]:  # fmt: skip
        s = self.resolve(s)
        props: dict[str, Any] = s.get("properties", {})
        if path in REGISTRY_CHOICES and "name" in props and "discriminator" not in props["name"]:
            return self.registry_choice(props, path, qual, when)
        nodes: list[Node] = []
        for key, sub in props.items():
            if key == skip:
                continue
            sub_path = f"{path}.{key}" if path else key
            nodes.extend(self.prop(key, sub, sub_path, [*qual, key], when))
        return nodes

    def union(
        self, s: Mapping[str, Any], path: str, qual: list[str], when: tuple[Condition, ...],
        selector_label: str,
    ) -> list[Node]:  # fmt: skip
        disc = s["discriminator"]["propertyName"]
        mapping: dict[str, str] = s["discriminator"]["mapping"]
        choices = {name: self.resolve({"$ref": ref}) for name, ref in mapping.items()}
        # Keep the schema's order (the registry's), not the mapping's alphabetical one.
        order = [
            self.resolve(o).get("properties", {}).get(disc, {}).get("const") for o in s["oneOf"]
        ]
        names = [n for n in order if n in choices] or list(choices)
        default = (
            (s.get("default") or {}).get(disc) or DEFAULT_CHOICES.get(path or disc) or names[0]
        )
        sel_path = f"{path}.{disc}" if path else disc
        sel_qual = [*qual, disc] if path else [disc]
        selector = self.add(
            Field(
                id="f-" + "-".join(sel_qual), name=sel_path, label=selector_label,
                widget="radio" if not path else "select", value_type="choice", default=default,
                help=_registry_help(path), when=when, selector=True,
                options=tuple(_choice_option(path, n) for n in names),
                choices={n: n for n in names},
            )
        )  # fmt: skip
        common = _shared_properties(self, choices.values(), disc)
        nodes: list[Node] = [selector]
        per_choice: list[Node] = []
        for name in names:
            cond = (selector.id, name)
            sub_when = (*when, cond)
            props = choices[name].get("properties", {})
            children: list[Node] = []
            for key, sub in props.items():
                if key == disc or key in common:
                    continue
                sub_path = f"{path}.{key}" if path else key
                children.extend(self.prop(key, sub, sub_path, [*qual, name, key], sub_when))
            group = Group(
                "g-" + "-".join([*qual, name]), path, _choice_legend(path, name),
                _choice_description(path, name, choices[name]), sub_when, tuple(children),
                local_when=cond, choice=True,
            )  # fmt: skip
            self.groups.append(group)
            per_choice.append(group)
        nodes.extend(per_choice)
        first = choices[names[0]].get("properties", {})
        for key in common:
            sub_path = f"{path}.{key}" if path else key
            nodes.extend(self.prop(key, first[key], sub_path, [*qual, key], when))
        return nodes

    def registry_choice(
        self, props: Mapping[str, Any], path: str, qual: list[str], when: tuple[Condition, ...]
    ) -> list[Node]:
        """`{name: str | None, params: dict | None}` over a registry (the evaluate dataset)."""
        registry = REGISTRY_CHOICES[path]
        name_schema, _ = self.split_nullable(props["name"])
        selector = self.add(
            Field(
                id="f-" + "-".join([*qual, "name"]), name=f"{path}.name",
                label=humanize(f"{path}.name"), widget="select", value_type="choice",
                default="", help=name_schema.get("description", ""), nullable=True, when=when,
                selector=True, choices={n: n for n in registry},
                options=(Option("", "Same as the source job"),
                         *(_choice_option(path, n) for n in registry)),
            )
        )  # fmt: skip
        nodes: list[Node] = [selector]
        for name, entry in registry.items():
            params = entry.params.model_json_schema()
            sub = _Builder(params)
            cond = (selector.id, name)
            children = sub.object(params, f"{path}.params", [*qual, name, "params"], (*when, cond))
            self.fields.extend(sub.fields)
            self.groups.extend(sub.groups)
            if children:
                group = Group(
                    "g-" + "-".join([*qual, name]), path, _choice_legend(path, name),
                    entry.description, (*when, cond), tuple(children), local_when=cond,
                    choice=True,
                )  # fmt: skip
                self.groups.append(group)
                nodes.append(group)
        for key, sub_schema in props.items():
            if key not in ("name", "params"):
                nodes.extend(self.prop(key, sub_schema, f"{path}.{key}", [*qual, key], when))
        return nodes


def _shared_properties(b: _Builder, choices: Any, disc: str) -> list[str]:
    """Properties every choice has with the same schema: rendered once, outside the groups."""
    schemas = [c.get("properties", {}) for c in choices]
    if len(schemas) < 2:
        return []
    shared = []
    for key, sub in schemas[0].items():
        if key == disc:
            continue
        dump = json.dumps(b.resolve(sub), sort_keys=True)
        if all(key in s and json.dumps(b.resolve(s[key]), sort_keys=True) == dump for s in schemas):
            shared.append(key)
    return shared


def _choice_option(path: str, name: str) -> Option:
    if path == "model" and name in MODELS:
        entry = MODELS[name]
        return Option(name, f"{name} · {' or '.join(entry.inputs)} data",
                      (("inputs", " ".join(entry.inputs)), ("tasks", " ".join(entry.tasks))))  # fmt: skip
    if path == "dataset" and name in DATASETS:
        d = DATASETS[name]
        return Option(name, f"{name} · {d.kind} {'/'.join(d.tasks)}",
                      (("kind", d.kind), ("tasks", " ".join(d.tasks))))  # fmt: skip
    if not path:
        return Option(name, RADIO_LABELS.get(name, name))
    return Option(name, name)


def _choice_legend(path: str, name: str) -> str:
    return f"{name} parameters" if path in ("model", "dataset") else f"{name} settings"


def _choice_description(path: str, name: str, schema: Mapping[str, Any]) -> str:
    if path == "model" and name in MODELS:
        return MODELS[name].description
    if path == "dataset" and name in DATASETS:
        return DATASETS[name].description
    return str(schema.get("description", ""))


def _registry_help(path: str) -> str:
    return "each model names the data it takes" if path == "model" else ""


def _walk_nodes(nodes: tuple[Node, ...] | list[Node]) -> Iterator[Node]:
    for node in nodes:
        yield node
        if isinstance(node, Group):
            yield from _walk_nodes(node.children)


def _top_key(node: Node) -> str:
    return node.name.split(".", 1)[0]


def _mark_image_only(nodes: list[Node], dataset_selector: str | None) -> list[Node]:
    out: list[Node] = []
    for node in nodes:
        if isinstance(node, Group):
            children = tuple(_mark_image_only(list(node.children), dataset_selector))
            image_only = dataset_selector if node.name in IMAGE_ONLY_GROUPS else None
            node = replace(node, children=children, image_only=image_only)
        out.append(node)
    return out


@cache
def job_form() -> JobForm:
    """The form for train and evaluate JobSpecs (built once: it depends only on the
    code's schemas)."""
    schema = TypeAdapter(FormSpec).json_schema()
    b = _Builder(schema)
    nodes = b.union(schema, "", [], (), selector_label=humanize("kind"))
    kind_selector = nodes[0]
    assert isinstance(kind_selector, Field)
    kind_groups = [n for n in nodes if isinstance(n, Group) and n.choice]
    shared = [n for n in nodes[1:] if not (isinstance(n, Group) and n.choice)]

    placed: dict[str | None, dict[str, list[Node]]] = {None: {}}
    for node in shared:
        placed[None].setdefault(_top_key(node), []).append(node)
    for group in kind_groups:
        assert group.local_when is not None
        kind = group.local_when[1]
        dataset_sel = next(
            (f.id for f in group.children if isinstance(f, Field) and f.name == "dataset.name"),
            None,
        )
        by_key = placed.setdefault(kind, {})
        for node in _mark_image_only(list(group.children), dataset_sel):
            by_key.setdefault(_top_key(node), []).append(node)
    placed[None].setdefault("kind", []).insert(0, kind_selector)

    taken: dict[str, list[Node]] = {s[0]: [] for s in SECTIONS}
    for kind, by_key in placed.items():
        kind_sections = [s for s in SECTIONS if s[2] == kind]
        for key, key_nodes in by_key.items():
            home = next((s[0] for s in kind_sections if key in s[4]), LEFTOVER_SECTION[kind])
            taken[home].extend(key_nodes)
    # Within a section, the SECTIONS order of keys; leftovers after, in schema order.
    sections = []
    for sid, title, kind, collapsed, keys in SECTIONS:
        ranked = sorted(
            taken[sid],
            key=lambda n, keys=keys: keys.index(_top_key(n)) if _top_key(n) in keys else len(keys),
        )
        if not ranked:
            continue
        when = ((kind_selector.id, kind),) if kind else ()
        sections.append(Section(f"s-{sid}", title, when, collapsed, tuple(ranked)))

    ordered_fields = [n for s in sections for n in _walk_nodes(s.children) if isinstance(n, Field)]
    assert len(ordered_fields) == len(b.fields), "every field is placed in a section"
    groups = [n for s in sections for n in _walk_nodes(s.children) if isinstance(n, Group)]
    siblings: dict[str, list[str]] = {}
    for f in ordered_fields:
        if f.widget not in ("checkbox", "file"):
            siblings.setdefault(f.name, []).append(f.id)
    return JobForm(
        sections=tuple(sections),
        fields=tuple(ordered_fields),
        groups=tuple(groups),
        by_id={f.id: f for f in ordered_fields},
        siblings={k: tuple(v) for k, v in siblings.items()},
        file_siblings=tuple(f.id for f in ordered_fields if f.widget == "file"),
        order={n.id: i for i, n in enumerate(n for s in sections for n in _walk_nodes(s.children))},
    )


# ---------------------------------------------------------------- values


Values = dict[str, Raw]


def _cond_value(raw: Raw | None) -> str:
    if isinstance(raw, bool):
        return "true" if raw else ""
    return raw or ""


def is_active(when: tuple[Condition, ...], values: Mapping[str, Raw]) -> bool:
    return all(_cond_value(values.get(sel)) == want for sel, want in when)


def default_values(form: JobForm) -> Values:
    return {f.id: f.default for f in form.fields}


_MISSING = object()


def _get_path(data: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return _MISSING
        data = data[part]
    return data


def values_from_spec(form: JobForm, spec: Mapping[str, Any]) -> Values:
    """The inputs filled from a stored spec (clone and edit)."""
    values = default_values(form)
    for f in form.fields:
        if f.widget == "file" or not is_active(f.when, values):
            continue
        found = _get_path(spec, f.name)
        if f.toggle:
            values[f.id] = found is not _MISSING and found is not None
        elif found is not _MISSING:
            raw = to_raw(found)
            # A yes/no/default select shows a stored boolean as its option's value.
            values[f.id] = (
                str(raw).lower() if f.widget == "select" and isinstance(raw, bool) else raw
            )
    return values


def values_from_form(form: JobForm, data: Any) -> Values:
    """The inputs as submitted (`data`: a werkzeug MultiDict), defaults where none came.

    With JS, only the active group's inputs arrive: one value per name. Without JS every
    group's inputs arrive, and the value for a field is the one at its position among
    the inputs of that name.
    """
    values = default_values(form)
    for f in form.fields:
        if f.widget == "file":
            continue
        sent = data.getlist(f.name)
        if f.widget == "checkbox":
            # Checked boxes send their field id; "on"/"true" from a hand-written client
            # counts for whichever box of that name is active.
            values[f.id] = f.id in sent or (
                is_active(f.when, values) and any(v in ("on", "true", "1") for v in sent)
            )
            continue
        sibs = form.siblings[f.name]
        if len(sent) == len(sibs):
            values[f.id] = sent[sibs.index(f.id)]
        elif sent and is_active(f.when, values):
            values[f.id] = sent[0]
    return values


def active_file_field(form: JobForm, values: Values) -> Field | None:
    for fid in form.file_siblings:
        f = form.by_id[fid]
        if is_active(f.when, values):
            return f
    return None


class ConversionError(ValueError):
    pass


def _convert(f: Field, raw: Raw) -> Any:
    """The JSON value of one input; ConversionError says what is wrong in words."""
    if f.value_type == "boolean":
        return bool(raw)
    assert isinstance(raw, str)
    text = raw.strip()
    if _CONTROL_CHARS.search(text) or "\x00" in text:
        raise ConversionError("must not contain control characters")
    if f.value_type == "strings":
        return [part.strip() for part in text.split(",") if part.strip()]
    if f.value_type == "numbers":
        try:
            return [_number(part) for part in text.split(",") if part.strip()]
        except ConversionError:
            raise ConversionError("must be numbers separated by commas") from None
    if f.value_type == "choice":
        # An unknown choice goes through as text: the spec's own message lists the choices.
        return f.choices.get(text, text)
    if f.value_type == "integer":
        if not _INTEGER.fullmatch(text):
            raise ConversionError("must be a whole number")
        number = int(text)
        if abs(number) > MAX_ID:
            raise ConversionError("is out of range")
        return number
    if f.value_type == "number":
        return _number(text)
    return text


def _number(text: str) -> float:
    text = text.strip()
    try:
        number = float(text)
    except ValueError:
        raise ConversionError("must be a number") from None
    if not math.isfinite(number) or "_" in text:
        raise ConversionError("must be a number")
    return number


def _set_path(spec: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = spec
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def spec_from_values(form: JobForm, values: Values) -> tuple[dict[str, Any], dict[str, str]]:
    """(the spec dict with JSON types, {dotted name: conversion error})."""
    spec: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for f in form.fields:
        if f.widget == "file" or not is_active(f.when, values):
            continue
        raw = values.get(f.id, f.default)
        if f.toggle:
            if raw:
                _set_path(spec, f.name, {})
            continue
        if isinstance(raw, str) and not raw.strip() and f.value_type not in ("strings", "numbers"):
            if not f.nullable:
                errors[f.name] = "choose one" if f.widget in ("select", "radio") else "required"
            continue  # an empty optional input: the spec's default applies
        try:
            value = _convert(f, raw)
        except ConversionError as exc:
            errors[f.name] = str(exc)
            continue
        if f.value_type in ("strings", "numbers") and not value and f.nullable:
            continue
        _set_path(spec, f.name, value)
    return spec, errors


# ---------------------------------------------------------------- errors


@dataclass(frozen=True)
class Problem:
    target: str | None  # the id of the input or group it is shown at; None: summary only
    label: str
    message: str


def place_errors(
    form: JobForm, values: Values, errors: Mapping[str, str]
) -> tuple[dict[str, list[str]], list[Problem]]:
    """Errors by input or group id (shown inline), and all of them for the summary, in
    the order of the page.

    A name with no input of its own ("optimizer.betas.0", "dataset.augment") goes to the
    nearest active input or group above it; "body" and the like only to the summary.
    """
    active_fields = {f.name: f for f in form.fields if is_active(f.when, values)}
    active_groups = {g.name: g for g in form.groups if is_active(g.when, values)}
    inline: dict[str, list[str]] = {}
    ranked: list[tuple[int, Problem]] = []
    for name, text in errors.items():
        message = text[:1].upper() + text[1:]
        parts = name.split(".")
        target: Field | Group | None = None
        while parts and target is None:
            key = ".".join(parts)
            target = active_fields.get(key) or active_groups.get(key)
            parts.pop()
        if target is None:
            label = "Job" if name == "body" else humanize(name)
            ranked.append((-1, Problem(None, label, message)))
            continue
        inline.setdefault(target.id, []).append(message)
        if isinstance(target, Field):
            problem = Problem(anchor(target), target.label, message)
        else:
            problem = Problem(target.id, target.legend, message)
        ranked.append((form.order[target.id], problem))
    ranked.sort(key=lambda item: item[0])
    return inline, [problem for _, problem in ranked]


def anchor(f: Field) -> str:
    """The element id a link to this field should focus (a radio group's first button)."""
    return f"{f.id}-{f.options[0].value}" if f.widget == "radio" else f.id


def section_has(section: Section, ids: Mapping[str, Any]) -> bool:
    """Whether any input or group in the section is a key of `ids` (to open it)."""
    return any(n.id in ids for n in _walk_nodes(section.children))
