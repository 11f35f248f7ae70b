"""The result record: what one cell leaves, typed and versioned.

A cell builds a :class:`ResultRecord` and the store writes ``as_dict()`` (schema 2) as JSON;
every reader (the results frame, the report, the CLI) goes through :meth:`ResultRecord.load`,
the one loader: it checks schema, key and status, gives each field its type (a field of the
wrong type reads as empty, never as a crash in a table) and upgrades older schemas.

Schema history: 1 (before issue 16) kept a re-ranker's metrics in ``test_rerank`` with its tag
in ``rerank_tag``; 2 keeps every further scorer's in ``test_variants`` (tag -> metrics).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rsnc_bench.cell_key import CellKey
from rsnc_bench.errors import ConfigError, RsncError

SCHEMA = 2
READABLE_SCHEMAS = (1, 2)
STATUSES = ("complete", "failed", "diverged")


class ResultFormatError(RsncError, ValueError):
    """A result file or document that is not a valid result document."""


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _metrics(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass
class ResultRecord:
    """One cell's result. ``test`` holds the method's own scorer's test metrics (its tag in
    ``score_tag``, "" for the full score), ``test_variants`` each further scorer's (a re-ranker),
    ``val`` the selected epoch's; ``detection`` scores the selected epoch's clean-ness signal."""

    key: CellKey
    status: str = "failed"
    error: str | None = None
    traceback: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    noise: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    selected_epoch: int | None = None
    selected_by: str = "val_mr"
    val: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    test_last: dict[str, Any] | None = None
    test_variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    score_tag: str = ""
    detection: dict[str, Any] | None = None
    detection_scores: str | None = None  # the per-row scores' file, relative to the store root
    timings: dict[str, Any] = field(default_factory=dict)
    finished_at: str | None = None
    schema: int = SCHEMA

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["key"] = self.key.as_dict()
        if out["traceback"] is None:
            del out["traceback"]
        return out

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def role(self) -> str | None:
        """The role the record declares (``Registered.role``); None for records without one."""
        return _mapping(self.config.get("capabilities")).get("role")

    def metrics(self, split: str) -> dict[str, Any] | None:
        """Metrics of "test", "val" or "test_last"."""
        return {"test": self.test, "val": self.val, "test_last": self.test_last}.get(split)

    @classmethod
    def load(cls, doc: Any) -> ResultRecord:
        """The one loader: a result document (any readable schema) as a record."""
        key = validate(doc)
        upgraded = _upgrade(doc)
        history = [entry for entry in doc.get("history") or [] if isinstance(entry, dict)] if isinstance(doc.get("history"), list) else []
        selected = doc.get("selected_epoch")
        return cls(
            key=key, status=doc["status"], error=_text(doc.get("error")), traceback=_text(doc.get("traceback")),
            config=_mapping(doc.get("config")), noise=_mapping(doc.get("noise")), environment=_mapping(doc.get("environment")),
            history=history, selected_epoch=selected if isinstance(selected, int) and not isinstance(selected, bool) else None,
            selected_by=_text(doc.get("selected_by")) or "val_mr", val=_metrics(doc.get("val")), test=_metrics(doc.get("test")),
            test_last=_metrics(doc.get("test_last")),
            test_variants={str(tag): m for tag, m in _mapping(upgraded.get("test_variants")).items() if isinstance(m, dict)},
            score_tag=_text(doc.get("score_tag")) or "", detection=_metrics(doc.get("detection")),
            detection_scores=_text(doc.get("detection_scores")), timings=_mapping(doc.get("timings")),
            finished_at=_text(doc.get("finished_at")), schema=SCHEMA,
        )


def _upgrade(doc: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 document in schema 2's terms (its re-ranker as the one test variant)."""
    if doc.get("schema") != 1 or not isinstance(doc.get("test_rerank"), dict):
        return doc
    tag = doc.get("rerank_tag")
    return {**doc, "test_variants": {tag if isinstance(tag, str) and tag else "rerank": doc["test_rerank"]}}


def validate(doc: Any) -> CellKey:
    """Check schema, key and status of a result document; returns its key."""
    if not isinstance(doc, dict):
        raise ResultFormatError(f"result document must be a JSON object, got {type(doc).__name__}")
    if doc.get("schema") not in READABLE_SCHEMAS:
        raise ResultFormatError(f"result schema {doc.get('schema')!r} is not supported "
                                f"(this version reads {', '.join(map(str, READABLE_SCHEMAS))}); upgrade rsnc-bench")
    if doc.get("status") not in STATUSES:
        raise ResultFormatError(f"result status {doc.get('status')!r} is not one of {', '.join(STATUSES)}")
    try:
        return CellKey.from_dict(doc.get("key"))
    except ConfigError as exc:
        raise ResultFormatError(f"result key: {exc}") from None
