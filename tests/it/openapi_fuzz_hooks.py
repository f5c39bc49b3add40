"""Schemathesis hooks for tests/it/openapi_fuzz.rs (loaded through SCHEMATHESIS_HOOKS).

The only rule of the admin API that its OpenAPI document cannot state: a time window must
not be empty (`since` < `until` for GET /admin/v1/events, `created_after` <
`created_before` for POST /admin/v1/replays). JSON Schema cannot compare two fields, so
the server answers such a window with a 400 naming the field, and these hooks keep the
fuzzer from sending one as "valid". Nothing else is filtered.
"""

from datetime import datetime

import schemathesis


def _time(value):
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None  # not a time: the server refuses it, and that is for the fuzzer to judge


def _empty_window(container, start, end):
    if not isinstance(container, dict):
        return False
    first, last = _time(container.get(start)), _time(container.get(end))
    try:
        return first is not None and last is not None and first >= last
    except TypeError:  # one with an offset, one without: cannot happen in RFC 3339
        return False


@schemathesis.hook
def filter_case(context, case):
    path = case.operation.path
    if path == "/admin/v1/events":
        return not _empty_window(case.query, "since", "until")
    if path == "/admin/v1/replays" and case.method.upper() == "POST":
        return not _empty_window(case.body, "created_after", "created_before")
    return True
