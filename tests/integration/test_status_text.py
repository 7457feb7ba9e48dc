"""What `status` and `events` print for a person: 100 columns (``--wide`` for one line per
item), every time in UTC with its ``Z``; `events --json` compact when piped, like `status`."""

from __future__ import annotations

import json
import re

from farmtools import TestFarm, add_certificate, expect_ok

from farmkeys.cli.render import WIDTH

TIME = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d)?(\.\d+)?(Z|[+-]\d\d:\d\d)?")


def times(text: str) -> list[str]:
    return [m.group(0) for m in TIME.finditer(text)]


def test_status_fits_100_columns_and_every_time_says_utc(initialised_farm: TestFarm) -> None:
    farm = initialised_farm
    for node in ("node-a", "node-b"):
        expect_ok(farm.run("sync", node=node))
    add_certificate(farm, purpose="signing", role="secondary")  # one more line, a next action
    narrow = farm.run("status")
    assert narrow.code in (0, 1), narrow
    lines = narrow.out.splitlines()
    assert max(len(line) for line in lines) <= WIDTH, "\n".join(lines)
    wide = farm.run("status", "--wide")
    assert max(len(line) for line in wide.out.splitlines()) > WIDTH  # the same items, unwrapped
    # Wrapping moves text between lines, never loses it.
    assert narrow.out.split() == wide.out.split()
    found = times(narrow.out)
    assert len(found) >= 8, narrow.out  # validity, lease, syncs, contacts ...
    assert all(t.endswith("Z") and "T" in t for t in found), found


def test_events_times_say_utc_and_json_is_compact_when_piped(initialised_farm: TestFarm) -> None:
    text = initialised_farm.run("events")
    found = times(text.out)
    assert found and all(t.endswith("Z") for t in found), text.out
    piped = initialised_farm.run("events", "--json")  # stdout is not a terminal here
    expect_ok(piped)
    assert piped.out.count("\n") == 1  # one line: the compact document
    events = json.loads(piped.out)
    assert events and all(e["at"].endswith("+00:00") for e in events)
