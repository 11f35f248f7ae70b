"""Are two result folders the same numbers? Cell by cell, for checking that a refactor moved nothing.

    python benchmarks/compare_results.py runs-before runs-after

Compares every cell both folders hold (the same relative paths): status, test / val / test_last
metrics, the selected epoch, every further scorer's test metrics (``test_variants``; schema-1
``test_rerank`` read as one), the tagged scorer, every epoch's val metrics and loss, detection
AUROC / AP / rows scored and ``detection_others``. Flag counts (precision, recall, rows flagged)
are listed apart, per cell whose flags moved at some epoch. Exits 1 when anything above differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rsnc_bench.record import ResultRecord


def records(root: Path) -> dict[str, ResultRecord]:
    out = {}
    for path in root.rglob("*.json"):
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and {"schema", "key", "status"} <= set(doc):
            out[path.relative_to(root).as_posix()] = ResultRecord.load(doc)
    return out


def detection(record: ResultRecord, fields: tuple[str, ...]) -> list:
    return [[(entry.get("detection") or {}).get(f) for f in fields] for entry in record.history]


def main() -> int:
    before, after = (records(Path(arg)) for arg in sys.argv[1:3])
    if set(before) != set(after):
        print(f"the folders hold different cells: {sorted(set(before) ^ set(after))[:10]}")
        return 1
    differ, flags = 0, []
    for name in sorted(before):
        x, y = before[name], after[name]
        checks = {"status": (x.status, y.status), "test": (x.test, y.test), "val": (x.val, y.val), "test_last": (x.test_last, y.test_last),
                  "selected_epoch": (x.selected_epoch, y.selected_epoch), "test_variants": (x.test_variants, y.test_variants),
                  "score_tag": (x.score_tag, y.score_tag), "history val": ([e.get("val") for e in x.history], [e.get("val") for e in y.history]),
                  "history loss": ([e.get("loss") for e in x.history], [e.get("loss") for e in y.history]),
                  "detection": (detection(x, ("auroc", "ap", "n_scored")), detection(y, ("auroc", "ap", "n_scored"))),
                  "detection_others": ([e.get("detection_others") for e in x.history], [e.get("detection_others") for e in y.history])}
        moved = [what for what, (a, b) in checks.items() if a != b]
        if moved:
            differ += 1
            print(f"DIFFERS {name}: {', '.join(moved)}")
        fields = ("flag_precision", "flag_recall", "n_flagged")
        if detection(x, fields) != detection(y, fields):
            flags.append(name)
    print(f"{len(before) - differ} of {len(before)} cells identical in metrics, selection, history and detection scores")
    if flags:
        print(f"{len(flags)} cells whose flag counts moved at some epoch: {', '.join(flags)}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
