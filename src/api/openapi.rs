//! The OpenAPI 3.1 description of the admin API and the compatibility endpoints, served at
//! `/admin/v1/openapi.json`. Derived, not written: `utoipa` builds it from the request and
//! response types (`#[derive(ToSchema)]`, `#[derive(IntoParams)]`) and from each handler's
//! `#[utoipa::path]`, and [`super::openapi`] collects the paths from the very router that
//! serves them.
//!
//! What the types alone cannot say lives here, once: the constrained strings the server
//! and the database enforce (event types, names, URLs, secrets, header names, text without
//! NUL, JSON without NUL), each a named schema that the fields refer to, and the responses
//! every guarded operation can give (401, 503). A schema fuzzer (schemathesis, run by
//! `tests/it/openapi_fuzz.rs`) checks that the server accepts what this says is valid and
//! refuses what it says is not.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::path::Operation;
use utoipa::openapi::schema::{
    AdditionalProperties, AnyOfBuilder, ArrayBuilder, ObjectBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi as _, PartialSchema, ToSchema};

/// Text PostgreSQL can store: anything but U+0000.
pub const NO_NUL: &str = r"^[^\u0000]*$";
/// `events.event_type` (`outbox.is_valid_event_type`).
pub const EVENT_TYPE: &str = "^[A-Za-z0-9._:-]{1,255}$";
/// An event type or a glob with `*` (`outbox.are_valid_event_type_patterns`).
pub const EVENT_TYPE_PATTERN: &str = "^[A-Za-z0-9._:*-]{1,255}$";
/// `subscriptions.name` (constraint `name_format`).
pub const SUBSCRIPTION_NAME: &str = "^[A-Za-z0-9._:-]{1,255}$";
// The parts every target URL pattern shares: an optional `user[:password]@` (the mask `***`
// is not among its characters, so a masked URL sent back never matches), a host (a DNS name
// whose last label starts with a letter or `_`, a dotted IPv4 address or a bracketed IPv6
// address) and an optional port. Macros, because `concat!` takes only literals.
macro_rules! url_authority {
    () => {
        concat!(url_userinfo!(), url_host!(), "(:", url_port!(), ")?",)
    };
}

macro_rules! url_userinfo {
    () => {
        "([A-Za-z0-9._~-]+(:[A-Za-z0-9._~-]+)?@)?"
    };
}

macro_rules! url_host {
    () => {
        concat!(
            "(",
            "([A-Za-z0-9_-]+\\.)*[A-Za-z_][A-Za-z0-9_-]*\\.?",
            "|((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])",
            "|\\[(",
            "([0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}",
            "|([0-9A-Fa-f]{1,4}:){1,7}:",
            "|([0-9A-Fa-f]{1,4}:){1,6}:[0-9A-Fa-f]{1,4}",
            "|([0-9A-Fa-f]{1,4}:){1,5}(:[0-9A-Fa-f]{1,4}){1,2}",
            "|([0-9A-Fa-f]{1,4}:){1,4}(:[0-9A-Fa-f]{1,4}){1,3}",
            "|([0-9A-Fa-f]{1,4}:){1,3}(:[0-9A-Fa-f]{1,4}){1,4}",
            "|([0-9A-Fa-f]{1,4}:){1,2}(:[0-9A-Fa-f]{1,4}){1,5}",
            "|[0-9A-Fa-f]{1,4}:(:[0-9A-Fa-f]{1,4}){1,6}",
            "|:((:[0-9A-Fa-f]{1,4}){1,7}|:)",
            ")\\]",
            ")",
        )
    };
}

macro_rules! url_port {
    () => {
        "([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
    };
}

macro_rules! webhook_url {
    () => {
        concat!(
            "^[Hh][Tt][Tt][Pp][Ss]?://",
            url_authority!(),
            "([/?#][!-~]*)?$"
        )
    };
}

/// A token of a NATS subject, a Redis stream name, an AMQP exchange or routing key as the
/// document spells them (the server takes a little more).
macro_rules! broker_name {
    () => {
        "[A-Za-z0-9._:-]+"
    };
}

/// `subscriptions.url` (constraint `url_scheme`, plus what a URL parser accepts) for a
/// webhook: http or https, the shared authority, then any printable ASCII without spaces. The
/// server accepts a little more (names with other characters, non-ASCII paths); this is what it
/// is guaranteed to accept. The compatibility API takes only these.
pub const WEBHOOK_URL: &str = webhook_url!();
/// `subscriptions.url` for any target: a webhook ([`WEBHOOK_URL`]) or a broker (SPEC "Broker
/// targets") in the forms the server is guaranteed to accept: `nats://…/subject`,
/// `redis[s]://…[/db]?stream=S[&maxlen=N]`, `amqp[s]://…[/vhost][?exchange=E[&routing_key=K]]`
/// (or `?routing_key=K` alone, for the default exchange), `kafka://host:port[,…]/topic`.
pub const TARGET_URL: &str = concat!(
    webhook_url!(),
    "|^[Nn][Aa][Tt][Ss]://",
    url_authority!(),
    "/[A-Za-z0-9_:-]+(\\.[A-Za-z0-9_:-]+)*$",
    "|^[Rr][Ee][Dd][Ii][Ss][Ss]?://",
    url_authority!(),
    "(/[0-9]{1,5})?\\?stream=",
    broker_name!(),
    "(&maxlen=[1-9][0-9]{0,17})?$",
    "|^[Aa][Mm][Qq][Pp][Ss]?://",
    url_authority!(),
    "(/([A-Za-z0-9._~-]|%2[Ff])*(\\?(exchange=",
    broker_name!(),
    "(&routing_key=",
    broker_name!(),
    ")?|routing_key=",
    broker_name!(),
    "))?)?$",
    // kafka://[user:pass@]host:port[,host:port...]/topic: every broker with its port; a topic
    // of Kafka's characters, at most 249, not starting with a dot ("." and ".." are refused).
    "|^[Kk][Aa][Ff][Kk][Aa]://",
    url_userinfo!(),
    url_host!(),
    ":",
    url_port!(),
    "(,",
    url_host!(),
    ":",
    url_port!(),
    ")*/[A-Za-z0-9_-][A-Za-z0-9._-]{0,248}$",
);
/// Longest `subscriptions.url` (constraint `url_scheme`).
pub const WEBHOOK_URL_MAX: usize = 2048;
/// `whsec_` and the canonical, padded base64 of at least 16 bytes: what the constraint
/// `secret_format` and the signer's decoder both accept.
pub const SECRET: &str = concat!(
    "^whsec_([A-Za-z0-9+/]{4}){5,}",
    "([A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=|[A-Za-z0-9+/][AQgw]==)$"
);
/// An `event_id` as the API takes it: a hyphenated UUID. (The server also takes other
/// spellings of a UUID; this is the one every answer uses.) A pattern, because `format` alone
/// only annotates in JSON Schema 2020-12: a fuzzer may send "" as a "uuid".
pub const EVENT_ID: &str =
    "^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$";
/// Header names the relay sets itself, which a subscription's `headers` cannot override
/// (`outbox.are_valid_headers`, compared without case).
pub const RESERVED_HEADERS: [&str; 9] = [
    "content-type",
    "content-length",
    "host",
    "user-agent",
    "transfer-encoding",
    "connection",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

/// A header name (an HTTP token of 1 to 128 characters) that is none of
/// [`RESERVED_HEADERS`] in any case. JSON Schema patterns have no case-insensitive flag, so
/// each letter of a reserved name becomes a class of both cases.
pub fn header_name_pattern() -> String {
    let reserved: Vec<String> = RESERVED_HEADERS
        .iter()
        .map(|name| {
            name.chars()
                .map(|c| {
                    if c.is_ascii_alphabetic() {
                        format!("[{}{}]", c.to_ascii_uppercase(), c.to_ascii_lowercase())
                    } else {
                        c.to_string()
                    }
                })
                .collect()
        })
        .collect();
    format!(
        "^(?!({})$)[A-Za-z0-9!#$%&'*+.^_`|~-]{{1,128}}$",
        reserved.join("|")
    )
}

fn string(pattern: &str, description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(pattern))
        .description(Some(description))
}

/// A named schema for a constrained string or JSON shape: a marker type whose only use is
/// `#[schema(value_type = …)]` on the fields it describes.
macro_rules! named_schema {
    ($(#[doc = $doc:literal])* $name:ident => $schema:expr) => {
        $(#[doc = $doc])*
        pub struct $name;

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                $schema.into()
            }
        }

        impl ToSchema for $name {}
    };
}

named_schema! {
    /// Text without NUL.
    Text => string(NO_NUL, "Text; PostgreSQL cannot store NUL (\\u0000), so it is refused (400).")
}

named_schema! {
    EventType => string(EVENT_TYPE, "An event type: 1 to 255 letters, digits and . _ : -, e.g. lead.created.")
        .min_length(Some(1))
        .max_length(Some(255))
}

named_schema! {
    EventTypePattern => string(
        EVENT_TYPE_PATTERN,
        "An event type or a glob with * as the wildcard: 1 to 255 letters, digits, . _ : - and *, e.g. lead.*.",
    )
    .min_length(Some(1))
    .max_length(Some(255))
}

named_schema! {
    SubscriptionName => string(
        SUBSCRIPTION_NAME,
        "A subscription name (the subscribing service): 1 to 255 letters, digits and . _ : -, e.g. ai-agents.",
    )
    .min_length(Some(1))
    .max_length(Some(255))
}

named_schema! {
    TargetUrl => string(
        TARGET_URL,
        "Where events go: an http:// or https:// webhook URL with a host, or a broker target: \
         nats://host:4222/subject (JetStream), redis://host:6379/0?stream=S[&maxlen=N] (or \
         rediss://), amqp://user:pass@host:5672/vhost?exchange=E[&routing_key=K] (or amqps://), \
         kafka://host:9092[,host:9092...]/topic (idempotent producer, acks=all). \
         Without spaces, at most 2048 characters. A password in it is shown as *** in every answer.",
    )
    .max_length(Some(WEBHOOK_URL_MAX))
}

named_schema! {
    WebhookUrl => string(
        WEBHOOK_URL,
        "An absolute http:// or https:// URL with a host, without spaces, at most 2048 characters. \
         A password in it is shown as *** in every answer.",
    )
    .max_length(Some(WEBHOOK_URL_MAX))
}

named_schema! {
    EventId => string(EVENT_ID, "An event's event_id (a UUID).")
        .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
            utoipa::openapi::KnownFormat::Uuid,
        )))
}

named_schema! {
    Secret => string(
        SECRET,
        "A signing secret: whsec_ followed by the base64 of at least 16 random bytes.",
    )
}

named_schema! {
    /// The text of a stored URL or secret as the API shows it.
    MaskedUrl => ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some("The URL with any password shown as ***."))
}

named_schema! {
    Headers => ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(
            "Static extra request headers. Names are HTTP tokens of at most 128 characters; \
             content-type, content-length, host, user-agent, transfer-encoding, connection and \
             the webhook-* headers are set by the relay and cannot be given.",
        ))
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(header_name_pattern())),
        ))
        .additional_properties(Some(Ref::from_schema_name(Text::name())))
}

named_schema! {
    /// Any JSON value without NUL in a string or key, at any depth.
    JsonValue => AnyOfBuilder::new()
        .description(Some(
            "Any JSON value; no string or key in it may hold NUL (\\u0000), which PostgreSQL \
             cannot store in jsonb.",
        ))
        .item(ObjectBuilder::new().schema_type(SchemaType::from_iter([Type::Null, Type::Boolean, Type::Number])))
        .item(Ref::from_schema_name(Text::name()))
        .item(ArrayBuilder::new().items(Ref::from_schema_name("JsonValue")))
        .item(json_object())
}

named_schema! {
    /// A JSON object whose values are [`JsonValue`]s.
    JsonObject => json_object().description(Some(
        "A JSON object; no string or key in it may hold NUL (\\u0000), at any depth.",
    ))
}

fn json_object() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(NO_NUL)),
        ))
        .additional_properties(Some(AdditionalProperties::RefOr(
            Ref::from_schema_name("JsonValue").into(),
        )))
}

const DESCRIPTION: &str = "Admin API (/admin/v1) and the previous event bus's compatibility \
endpoints. Enabled only when OUTBOX_ADMIN_TOKEN is set; every operation but this document \
needs Authorization: Bearer <token>. Errors: {\"error\": {\"code\", \"message\", \"field\"}}. \
Text anywhere in a request (body strings and keys at any depth, query and path parameters) \
must be UTF-8 without NUL (\\u0000), which PostgreSQL cannot store: such input is a 400 \
invalid_input naming the field. Derived from the server's types; a schema fuzzer checks it \
against the server.";

#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "outbox-relay admin API", description = DESCRIPTION),
    modifiers(&BearerScheme),
    security(("bearer" = [])),
)]
struct ApiDoc;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The whole document: info, security and `paths` (with the schemas they use).
pub fn root(paths: OpenApi) -> OpenApi {
    let mut api = ApiDoc::openapi().merge_from(paths);
    if let Some(components) = api.components.as_mut() {
        for schema in components.schemas.values_mut() {
            keys_without_nul(schema);
        }
    }
    api
}

/// Object schemas that take keys of their own (a map, or a compatibility body's ignored
/// fields) get `propertyNames` without NUL: the server refuses NUL in keys too, and a derive
/// cannot say so for a `#[serde(flatten)]` map.
fn keys_without_nul(schema: &mut RefOr<Schema>) {
    if let RefOr::T(Schema::Object(object)) = schema
        && object.additional_properties.is_some()
        && object.property_names.is_none()
    {
        object.property_names = Some(Box::new(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(NO_NUL))
                .into(),
        ));
    }
}

/// Adds to every operation of `api` the answers the token check and the database pool can
/// give whatever the operation: 401 and 503.
pub fn guarded(mut api: OpenApi) -> OpenApi {
    for item in api.paths.paths.values_mut() {
        for operation in operations(item) {
            add_error(
                operation,
                "401",
                "Missing or wrong bearer token (WWW-Authenticate: Bearer).",
            );
            add_error(
                operation,
                "503",
                "No database connection available, or the schema needs `outbox-relay migrate`.",
            );
        }
    }
    api
}

fn operations(item: &mut utoipa::openapi::PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        item.get.as_mut(),
        item.put.as_mut(),
        item.post.as_mut(),
        item.delete.as_mut(),
        item.options.as_mut(),
        item.head.as_mut(),
        item.patch.as_mut(),
        item.trace.as_mut(),
    ]
    .into_iter()
    .flatten()
}

fn add_error(operation: &mut Operation, status: &str, description: &str) {
    let response = ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name(super::ErrorBody::name())))
                .build(),
        )
        .build();
    operation
        .responses
        .responses
        .entry(status.to_owned())
        .or_insert_with(|| response.into());
}

/// This document.
#[utoipa::path(
    get,
    path = "/admin/v1/openapi.json",
    tag = "meta",
    security(()),
    responses((status = 200, description = "This OpenAPI 3.1 document.", body = Object)),
)]
pub async fn document() -> impl IntoResponse {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let document = DOCUMENT.get_or_init(|| {
        // Serialising a document of string keys and JSON values cannot fail.
        super::openapi()
            .to_json()
            .expect("the OpenAPI document serialises to JSON")
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        document.as_str(),
    )
}
