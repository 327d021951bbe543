"""The margins record (tests/margins.json, written by `make margins`) covers every claim as it is now."""

import json

import margins

MIN_SEEDS = 5


def test_every_claim_has_measured_margins_under_its_current_bounds():
    claims = margins.load_all()
    assert claims, "no claim is registered"
    record = json.loads(margins.RECORD.read_text())["claims"]
    stale = []
    for name, c in claims.items():
        entry = record.get(name)
        if entry is None:
            stale.append(f"{name}: not measured")
            continue
        rows = {r["value"]: r for r in entry["rows"]}
        for key, (op, bound) in c.bounds.items():
            row = rows.get(key)
            if row is None or (row["op"], row["bound"]) != (op, bound):
                stale.append(f"{name}: {key} {op} {bound} was measured with another bound or not at all")
            elif not row["ok"]:
                stale.append(f"{name}: {key} measured z = {row['z']:.2f} (< {margins.Z_REQUIRED}) or a failing run")
        if len(entry["seeds"]) < MIN_SEEDS or not {1, 2} <= set(entry["threads"]):
            stale.append(f"{name}: measured at seeds {entry['seeds']}, threads {entry['threads']}")
    assert not stale, "run `make margins MARGINS='-k NAME'` for:\n" + "\n".join(stale)


def test_the_table_is_the_record():
    record = json.loads(margins.RECORD.read_text())
    assert margins.TABLE.read_text() == margins.render(record)
