//! The OpenAPI 3 description of the admin API and the compatibility endpoints, served at
//! `/admin/v1/openapi.json`. Written by hand (a document, not derived from the handlers),
//! so a test checks that it lists every route the router serves.

use axum::response::IntoResponse;
use serde_json::{Value, json};

pub async fn document() -> impl IntoResponse {
    axum::Json(build())
}

fn reference(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn json_body(schema: Value) -> Value {
    json!({ "content": { "application/json": { "schema": schema } } })
}

fn ok(description: &str, schema: Value) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": schema } } })
}

fn error(description: &str) -> Value {
    ok(description, reference("Error"))
}

/// The responses every guarded operation can give besides its own.
fn with_errors(mut responses: Value, extra: &[(&str, &str)]) -> Value {
    let map = responses
        .as_object_mut()
        .expect("responses are built as a JSON object literal");
    map.insert(
        "401".into(),
        error("Missing or wrong bearer token (WWW-Authenticate: Bearer)."),
    );
    map.insert(
        "503".into(),
        error("Database unavailable or schema outdated."),
    );
    for (status, description) in extra {
        map.insert((*status).into(), error(description));
    }
    responses
}

fn path_param(name: &str, description: &str) -> Value {
    json!({ "name": name, "in": "path", "required": true, "description": description,
            "schema": { "type": "string" } })
}

fn query_param(name: &str, description: &str, schema: Value) -> Value {
    json!({ "name": name, "in": "query", "required": false, "description": description,
            "schema": schema })
}

fn operation(
    summary: &str,
    parameters: Vec<Value>,
    body: Option<Value>,
    responses: Value,
) -> Value {
    let mut op = json!({ "summary": summary, "parameters": parameters, "responses": responses });
    if let Some(body) = body {
        op["requestBody"] = body;
    }
    op
}

fn subscription_name() -> Value {
    path_param("name", "Subscription name.")
}

fn page_params() -> Vec<Value> {
    vec![
        query_param(
            "limit",
            "Page size, 1 to 500 (default 50).",
            json!({ "type": "integer", "minimum": 1, "maximum": 500 }),
        ),
        query_param(
            "cursor",
            "next_cursor of the previous page.",
            json!({ "type": "string" }),
        ),
    ]
}

pub fn build() -> Value {
    let string = json!({ "type": "string" });
    let nullable_string = json!({ "type": ["string", "null"] });
    let time = json!({ "type": "string", "format": "date-time" });
    let nullable_time = json!({ "type": ["string", "null"], "format": "date-time" });
    let object = json!({ "type": "object" });
    let strings = json!({ "type": "array", "items": { "type": "string" } });

    let subscription_settings = json!({
        "event_types": { "type": "array", "items": { "type": "string" }, "description": "Exact names or globs (lead.*, *)." },
        "tenant_id": { "type": ["string", "null"], "description": "null = every tenant." },
        "filter": { "type": ["object", "null"], "description": "The payload must contain it (payload @> filter)." },
        "headers": { "type": "object", "additionalProperties": { "type": "string" } },
        "timeout_seconds": { "type": "number" },
        "max_in_flight": { "type": "integer" },
        "rate_limit_per_second": { "type": ["number", "null"] },
        "retry_schedule_seconds": { "type": "array", "items": { "type": "number" } },
        "ordered": { "type": "boolean" }
    });
    let mut create_properties = subscription_settings.clone();
    create_properties["name"] = string.clone();
    create_properties["url"] = json!({ "type": "string", "format": "uri" });
    create_properties["secret"] =
        json!({ "type": "string", "description": "whsec_…; generated when omitted." });
    let mut update_properties = subscription_settings;
    update_properties["url"] = json!({ "type": "string", "format": "uri" });

    let schemas = json!({
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": { "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": { "type": "string", "enum": ["invalid_input", "unauthorized", "not_found", "duplicate", "duplicate_event", "schema_outdated", "unavailable", "internal"] },
                    "message": { "type": "string" },
                    "field": { "type": "string", "description": "The input to blame, when there is one, as the request spells it: name, headers.X-Team, event_types[1]." }
                }
            }}
        },
        "Subscription": {
            "type": "object",
            "description": "A subscription; never carries its secret.",
            "properties": {
                "id": { "type": "integer" }, "name": string, "url": string,
                "event_types": strings, "tenant_id": nullable_string, "filter": { "type": ["object", "null"] },
                "enabled": { "type": "boolean" }, "disabled_reason": nullable_string,
                "ordered": { "type": "boolean" },
                "retry_schedule_seconds": { "type": "array", "items": { "type": "number" } },
                "timeout_seconds": { "type": "number" }, "max_in_flight": { "type": "integer" },
                "rate_limit_per_second": { "type": ["number", "null"] },
                "headers": { "type": "object", "additionalProperties": { "type": "string" } },
                "created_at": time, "updated_at": time, "previous_secret_expires_at": nullable_time
            }
        },
        "SubscriptionCreate": { "type": "object", "required": ["name", "url"], "additionalProperties": false, "properties": create_properties },
        "SubscriptionUpdate": { "type": "object", "additionalProperties": false, "properties": update_properties,
                                "description": "Only the given settings change; null clears tenant_id, filter, rate_limit_per_second." },
        "CreatedSubscription": { "allOf": [ reference("Subscription"),
            { "type": "object", "properties": { "secret": { "type": "string", "description": "Shown only here and by rotate-secret." } } } ] },
        "RemovedSubscription": { "type": "object", "properties": { "id": { "type": "integer" }, "name": string, "deliveries_ended": { "type": "integer" } } },
        "RotatedSecret": { "type": "object", "properties": { "id": { "type": "integer" }, "name": string, "secret": string, "previous_secret_expires_at": nullable_time } },
        "EventSummary": {
            "type": "object",
            "properties": {
                "id": { "type": "integer", "description": "Internal order; the pagination key." },
                "event_id": { "type": "string", "format": "uuid" }, "event_type": string,
                "tenant_id": nullable_string, "source_service": nullable_string, "ordering_key": nullable_string,
                "target_services": { "type": ["array", "null"], "items": { "type": "string" } },
                "metadata": object, "priority": { "type": "integer" },
                "deliver_after": time, "created_at": time, "dispatched_at": nullable_time,
                "deliveries": { "type": "object", "additionalProperties": { "type": "integer" }, "description": "Deliveries per status." }
            }
        },
        "EventPage": { "type": "object", "properties": {
            "events": { "type": "array", "items": reference("EventSummary") },
            "next_cursor": nullable_string } },
        "Attempt": { "type": "object", "properties": {
            "id": { "type": "integer" }, "attempt": { "type": "integer" }, "started_at": time,
            "duration_ms": { "type": "integer" }, "status_code": { "type": ["integer", "null"] },
            "error": nullable_string, "response_body": nullable_string, "replay_id": { "type": ["integer", "null"] } } },
        "Delivery": { "type": "object", "properties": {
            "id": { "type": "integer" }, "subscription_id": { "type": ["integer", "null"] }, "subscription": nullable_string,
            "status": { "type": "string", "enum": ["pending", "in_flight", "delivered", "failing", "dead"] },
            "attempts": { "type": "integer" }, "next_attempt_at": time, "last_status_code": { "type": ["integer", "null"] },
            "last_error": nullable_string, "created_at": time, "delivered_at": nullable_time,
            "replay_id": { "type": ["integer", "null"] },
            "attempt_history": { "type": "array", "items": reference("Attempt"), "description": "Latest first, at most 100." } } },
        "EventDetail": { "allOf": [ reference("EventSummary"), { "type": "object", "properties": {
            "payload": {}, "delivery_list": { "type": "array", "items": reference("Delivery") } } } ] },
        "ReplayRequest": { "type": "object", "additionalProperties": false, "description": "The criteria of outbox.replay.", "properties": {
            "status": { "type": "array", "items": { "type": "string" }, "description": "Default [dead]." },
            "subscription": string, "event_type": { "type": "string", "description": "Exact or glob." },
            "tenant_id": string, "created_after": time, "created_before": time,
            "event_ids": { "type": "array", "items": { "type": "string", "format": "uuid" } },
            "max_events": { "type": "integer", "minimum": 1 },
            "requested_by": { "type": "string", "description": "Default admin-api." },
            "reason": string, "dry_run": { "type": "boolean" } } },
        "Replay": { "type": "object", "properties": {
            "id": { "type": "integer" }, "requested_at": time, "requested_by": string, "reason": nullable_string,
            "criteria": object, "matched": { "type": "integer" }, "dry_run": { "type": "boolean" } } },
        "ReplayPage": { "type": "object", "properties": {
            "replays": { "type": "array", "items": reference("Replay") }, "next_cursor": nullable_string } },
        "CompatSubscription": { "type": "object", "properties": {
            "id": { "type": "integer" }, "service_name": string, "event_types": strings, "webhook_url": string,
            "filters": { "type": ["object", "null"] }, "tenant_id": nullable_string, "enabled": { "type": "boolean" } } },
        "CompatReplay": { "type": "object", "properties": {
            "replay_id": { "type": "integer" }, "matched": { "type": "integer" }, "dry_run": { "type": "boolean" },
            "event_id": { "type": "string", "format": "uuid" } } }
    });

    let subscriptions_list = json!({ "type": "object", "properties": { "subscriptions": { "type": "array", "items": reference("Subscription") } } });

    let mut paths = serde_json::Map::new();
    paths.insert(
        "/admin/v1/openapi.json".into(),
        json!({ "get": {
            "summary": "This document (no token needed).", "security": [],
            "responses": { "200": ok("OpenAPI 3 document.", object.clone()) } } }),
    );
    paths.insert("/admin/v1/subscriptions".into(), json!({
            "get": operation("List subscriptions (by name).", vec![], None,
                with_errors(json!({ "200": ok("Subscriptions.", subscriptions_list) }), &[])),
            "post": operation("Create a subscription; the answer carries its secret.", vec![],
                Some(json_body(reference("SubscriptionCreate"))),
                with_errors(json!({ "201": ok("Created.", reference("CreatedSubscription")) }),
                    &[("400", "Invalid input; error.field names it."), ("409", "A subscription with this name exists.")]))
        }));
    paths.insert("/admin/v1/subscriptions/{name}".into(), json!({
            "get": operation("One subscription.", vec![subscription_name()], None,
                with_errors(json!({ "200": ok("The subscription.", reference("Subscription")) }), &[("400", "Invalid input (e.g. a name holding NUL); error.field names it."), ("404", "No such subscription.")])),
            "patch": operation("Change the given settings.", vec![subscription_name()],
                Some(json_body(reference("SubscriptionUpdate"))),
                with_errors(json!({ "200": ok("The subscription now.", reference("Subscription")) }),
                    &[("400", "Invalid input; error.field names it."), ("404", "No such subscription.")])),
            "delete": operation("Delete; its open deliveries become dead.", vec![subscription_name()], None,
                with_errors(json!({ "200": ok("Removed.", reference("RemovedSubscription")) }), &[("400", "Invalid input (e.g. a name holding NUL); error.field names it."), ("404", "No such subscription.")]))
        }));
    paths.insert("/admin/v1/subscriptions/{name}/disable".into(), json!({ "post": operation("Stop delivering to it.", vec![subscription_name()],
            Some(json_body(json!({ "type": "object", "properties": { "reason": string } }))),
            with_errors(json!({ "200": ok("The subscription now.", reference("Subscription")) }), &[("400", "Invalid input (e.g. a name holding NUL); error.field names it."), ("404", "No such subscription.")])) }));
    paths.insert("/admin/v1/subscriptions/{name}/enable".into(), json!({ "post": operation("Deliver to it again.", vec![subscription_name()], None,
            with_errors(json!({ "200": ok("The subscription now.", reference("Subscription")) }), &[("400", "Invalid input (e.g. a name holding NUL); error.field names it."), ("404", "No such subscription.")])) }));
    paths.insert("/admin/v1/subscriptions/{name}/rotate-secret".into(), json!({ "post": operation(
            "Replace the signing secret; both sign during the overlap (default 86400 s).", vec![subscription_name()],
            Some(json_body(json!({ "type": "object", "properties": { "overlap_seconds": { "type": "number" }, "secret": string } }))),
            with_errors(json!({ "200": ok("The new secret.", reference("RotatedSecret")) }),
                &[("400", "Invalid input; error.field names it."), ("404", "No such subscription.")])) }));
    paths.insert("/admin/v1/events".into(), json!({ "get": operation("Search events, newest first, by keyset pages.",
            [vec![
                query_param("event_type", "Exact or glob.", string.clone()),
                query_param("tenant_id", "", string.clone()),
                query_param("since", "created_at >= since (RFC 3339).", time.clone()),
                query_param("until", "created_at < until (RFC 3339).", time.clone()),
                query_param("status", "Only events with a delivery in this status.",
                    json!({ "type": "string", "enum": ["pending", "in_flight", "delivered", "failing", "dead"] })),
            ], page_params()].concat(), None,
            with_errors(json!({ "200": ok("A page of events.", reference("EventPage")) }), &[("400", "Invalid input; error.field names it.")])) }));
    paths.insert(
        "/admin/v1/events/{event_id}".into(),
        json!({ "get": operation("One event with payload, deliveries and attempts.",
            vec![path_param("event_id", "The event's uuid.")], None,
            with_errors(json!({ "200": ok("The event.", reference("EventDetail")) }),
                &[("400", "Not a uuid."), ("404", "No such event.")])) }),
    );
    paths.insert("/admin/v1/replays".into(), json!({
            "get": operation("Replays and backfills, newest first.", page_params(), None,
                with_errors(json!({ "200": ok("A page of replays.", reference("ReplayPage")) }), &[("400", "Invalid input; error.field names it.")])),
            "post": operation("Run outbox.replay (or count with dry_run).", vec![],
                Some(json_body(reference("ReplayRequest"))),
                with_errors(json!({ "201": ok("The recorded replay.", reference("Replay")) }), &[("400", "Invalid input; error.field names it.")]))
        }));
    paths.insert("/admin/v1/replays/{id}".into(), json!({ "get": operation("One replay.", vec![path_param("id", "Replay id.")], None,
            with_errors(json!({ "200": ok("The replay.", reference("Replay")) }), &[("400", "Not an id."), ("404", "No such replay.")])) }));
    paths.insert("/events/publish".into(), json!({ "post": operation("Compatibility: publish an event (inserts into outbox.events).", vec![],
            Some(json_body(json!({ "type": "object", "required": ["event_type"], "properties": {
                "event_type": string, "tenant_id": string, "source_service": string,
                "data": { "description": "Becomes the payload; {} when absent." },
                "priority": { "type": "string", "enum": ["low", "normal", "high"], "description": "-10, 0, 10 in events.priority." },
                "target_services": strings, "event_id": { "type": "string", "format": "uuid" },
                "correlation_id": { "type": "string", "description": "Stored as metadata.correlation_id." },
                "metadata": object, "ordering_key": string } }))),
            with_errors(json!({ "201": ok("Stored.", json!({ "type": "object", "properties": {
                "event_id": { "type": "string", "format": "uuid" }, "status": { "type": "string", "enum": ["accepted"] } } })) }),
                &[("400", "Invalid input; error.field names it."), ("409", "event_id already published (code duplicate_event).")])) }));
    paths.insert("/events/subscribe".into(), json!({ "post": operation(
            "Compatibility: create or extend the subscription named service_name.", vec![],
            Some(json_body(json!({ "type": "object", "required": ["event_type", "service_name", "webhook_url"], "properties": {
                "event_type": string, "service_name": string, "webhook_url": string,
                "filters": { "type": ["object", "null"] } } }))),
            with_errors(json!({
                "201": ok("Created; carries the secret.", json!({ "allOf": [reference("CompatSubscription"),
                    { "type": "object", "properties": { "created": { "type": "boolean" }, "secret": string } }] })),
                "200": ok("Updated (no secret).", json!({ "allOf": [reference("CompatSubscription"),
                    { "type": "object", "properties": { "created": { "type": "boolean" } } }] })) }),
                &[("400", "Invalid input; error.field names it.")])) }));
    paths.insert("/subscriptions".into(), json!({ "get": operation("Compatibility: list subscriptions.", vec![], None,
            with_errors(json!({ "200": ok("Subscriptions.", json!({ "type": "object", "properties": {
                "subscriptions": { "type": "array", "items": reference("CompatSubscription") } } })) }), &[])) }));
    paths.insert("/events/history".into(), json!({ "post": operation("Compatibility: latest events with their data, newest first.", vec![],
            Some(json_body(json!({ "type": "object", "properties": {
                "tenant_id": string, "event_types": strings, "limit": { "type": "integer", "minimum": 1, "maximum": 100 } } }))),
            with_errors(json!({ "200": ok("Events.", json!({ "type": "object", "properties": {
                "count": { "type": "integer" },
                "events": { "type": "array", "items": { "type": "object", "properties": {
                    "event_id": { "type": "string", "format": "uuid" }, "event_type": string, "tenant_id": nullable_string,
                    "source_service": nullable_string, "data": {}, "metadata": object, "priority": { "type": "integer" },
                    "target_services": { "type": ["array", "null"], "items": { "type": "string" } },
                    "created_at": time, "dispatched": { "type": "boolean" },
                    "deliveries": { "type": "object", "additionalProperties": { "type": "integer" } } } } } } })) }),
                &[("400", "Invalid input; error.field names it.")])) }));
    paths.insert("/api/events/{event_id}/replay".into(), json!({ "post": operation(
            "Compatibility: re-send one event's dead, failing and delivered deliveries (via outbox.replay).",
            vec![path_param("event_id", "The event's uuid.")], None,
            with_errors(json!({ "200": ok("Replayed.", reference("CompatReplay")) }), &[("400", "Not a uuid."), ("404", "No such event.")])) }));
    paths.insert("/api/events/replay/batch".into(), json!({ "post": operation("Compatibility: replay many deliveries (via outbox.replay).",
            vec![
                query_param("event_type", "Exact or glob.", string.clone()),
                query_param("tenant_id", "", string.clone()),
                query_param("status", "Comma-separated delivery statuses (default dead).", string.clone()),
                query_param("limit", "Deliveries at most, 1 to 10000 (default 100).", json!({ "type": "integer", "minimum": 1, "maximum": 10000 })),
                query_param("dry_run", "Only count.", json!({ "type": "boolean" })),
            ], None,
            with_errors(json!({ "200": ok("Replayed.", reference("CompatReplay")) }), &[("400", "Invalid input; error.field names it.")])) }));
    paths.insert("/api/events/status/pending".into(), json!({ "get": operation("Compatibility: backlog and open deliveries.", vec![], None,
            with_errors(json!({ "200": ok("Backlog.", json!({ "type": "object", "properties": {
                "undispatched_events": { "type": "integer" }, "oldest_undispatched_age_seconds": { "type": ["number", "null"] },
                "scheduled_events": { "type": "integer" }, "pending_deliveries": { "type": "integer" },
                "in_flight_deliveries": { "type": "integer" }, "failing_deliveries": { "type": "integer" },
                "dead_deliveries": { "type": "integer" },
                "subscriptions": { "type": "array", "items": { "type": "object" } } } })) }), &[])) }));

    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "outbox-relay admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Admin API (/admin/v1) and the previous event bus's compatibility endpoints. Enabled only when OUTBOX_ADMIN_TOKEN is set; every operation but this document needs Authorization: Bearer <token>. Errors: {\"error\": {\"code\", \"message\", \"field\"}}. Text anywhere in a request (body strings at any depth, query and path parameters) must be UTF-8 without NUL (\\u0000), which PostgreSQL cannot store: such input is a 400 invalid_input naming the field."
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } }
        },
        "security": [ { "bearer": [] } ],
        "paths": paths
    })
}
