"""The typed, versioned result record: one loader, older schemas upgraded, odd fields read as empty."""

from __future__ import annotations

import pytest

from rsnc_bench.record import SCHEMA, ResultFormatError, ResultRecord

from .test_store import make_doc, make_key


def test_a_record_round_trips_through_its_document():
    record = ResultRecord(make_key(), status="complete", test={"mr": 40.0}, test_variants={"sar": {"mr": 41.0}},
                          score_tag="top100", history=[{"epoch": 1, "val": {"mr": 39.0}}], selected_epoch=1)
    doc = record.as_dict()
    assert doc["schema"] == SCHEMA == 2 and doc["key"] == make_key().as_dict() and "traceback" not in doc
    assert ResultRecord.load(doc) == record


def test_schema_1_documents_are_upgraded_by_the_loader():
    doc = {**make_doc(make_key(method="iebaker")), "test_rerank": {"mr": 45.0}, "rerank_tag": "sar"}
    assert doc["schema"] == 1
    record = ResultRecord.load(doc)
    assert record.test_variants == {"sar": {"mr": 45.0}} and record.schema == SCHEMA
    untagged = ResultRecord.load({**make_doc(make_key()), "test_rerank": {"mr": 1.0}})
    assert untagged.test_variants == {"rerank": {"mr": 1.0}}


def test_fields_of_the_wrong_type_read_as_empty_and_bad_documents_are_refused():
    doc = {**make_doc(make_key()), "config": [1], "history": "x", "selected_epoch": True, "score_tag": 3, "test": "40"}
    record = ResultRecord.load(doc)
    assert (record.config, record.history, record.selected_epoch, record.score_tag, record.test) == ({}, [], None, "", None)
    with pytest.raises(ResultFormatError, match=r"reads 1, 2\); upgrade rsnc-bench"):
        ResultRecord.load({**make_doc(make_key()), "schema": 3})
    with pytest.raises(ResultFormatError, match="status"):
        ResultRecord.load({**make_doc(make_key()), "status": "running"})
