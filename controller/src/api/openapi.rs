//! The API's OpenAPI 3.0 document (`GET /v1/openapi.json`): every route of
//! [`super::ROUTES`] with its parameters, its request body's schema and
//! constraints, and every status it can answer with that status's schema.
//!
//! The rule the statuses follow, which a schema-driven fuzzer checks:
//! - 400: the request does not match this document (not JSON, a wrong type, a
//!   missing or unknown field, a pattern or range violated);
//! - 422: it matches, but means nothing (a prefix with host bits set, a block
//!   length that does not fit its range, a link from a node to itself): what
//!   JSON Schema cannot say;
//! - 404 / 409: the state (no such object; no free block left);
//! - 413 / 415: a body over [`super::MAX_BODY_BYTES`], or not sent as JSON;
//! - 401 on every route without the bearer token, 503 while the state store
//!   (or the controller) cannot answer, 500 for a bug.
//!
//! Bounds come from [`super::limits`], so the document and the checks agree.

use super::limits::{self, CIDR_MAX_LEN, CIDR_PATTERN, PREFIX_LEN_MAX, WEIGHT_MS_MAX};
use super::{MAX_BODY_BYTES, ROUTES};
use serde_json::{json, Map, Value};

/// A node name (a DNS label), as the registry checks it.
pub(crate) const NAME_PATTERN: &str = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$";
/// A site, cloud or region label, as the registry checks it.
pub(crate) const LABEL_PATTERN: &str = "^[A-Za-z0-9._-]{1,63}$";

/// What one operation takes and answers, beyond the summary in [`ROUTES`].
struct Operation {
    /// Schema name of the JSON request body.
    body: Option<&'static str>,
    /// The success status and its body.
    ok: (u16, Answer),
    /// Every other status besides 401 and 503, which every route can give, and
    /// [`BODY`]'s, which every route with a body can.
    errors: &'static [u16],
}

/// What a success carries.
#[derive(Clone)]
enum Answer {
    Json(Value),
    /// Prometheus text.
    Text,
    /// A file.
    Binary,
}

/// Statuses of every route that takes a JSON body: not the document's shape,
/// too large, not JSON.
const BODY: &[u16] = &[400, 413, 415];

fn operation(method: &str, path: &str) -> Option<Operation> {
    let list = |name: &str| Answer::Json(json!({"type": "array", "items": schema_ref(name)}));
    let one = |name: &str| Answer::Json(schema_ref(name));
    let op = |body, ok, errors| Some(Operation { body, ok, errors });
    match (method, path) {
        ("GET", "/healthz") => op(None, (200, one("Health")), &[]),
        ("GET", "/metrics") => op(None, (200, Answer::Text), &[500]),
        ("GET", "/v1/openapi.json") => {
            op(None, (200, Answer::Json(json!({"type": "object"}))), &[])
        }
        ("POST", "/v1/backup") => op(None, (200, Answer::Binary), &[500]),
        ("GET", "/v1/nodes") => op(None, (200, list("Node")), &[500]),
        ("GET", "/v1/nodes/{name}") => op(None, (200, one("Node")), &[400, 404, 500]),
        ("DELETE", "/v1/nodes/{name}") => op(None, (200, one("Revoked")), &[400, 404, 500]),
        ("POST", "/v1/join-tokens") => op(
            Some("CreateJoinToken"),
            (201, one("CreatedJoinToken")),
            &[500],
        ),
        ("GET", "/v1/join-tokens") => op(None, (200, list("JoinToken")), &[500]),
        ("DELETE", "/v1/join-tokens/{id}") => op(None, (200, one("Revoked")), &[400, 404, 500]),
        ("GET", "/v1/prefixes") => op(None, (200, list("Prefix")), &[500]),
        ("POST", "/v1/ipam/check") => op(
            Some("IpamCheck"),
            (200, one("IpamCheckResult")),
            &[422, 500],
        ),
        ("POST", "/v1/ipam/suggest") => op(
            Some("IpamSuggest"),
            (200, one("IpamSuggestResult")),
            &[409, 422, 500],
        ),
        ("GET", "/v1/links") => op(None, (200, list("Link")), &[400, 404]),
        ("GET", "/v1/paths") => op(None, (200, list("Pair")), &[400, 404]),
        ("PUT", "/v1/links/{a}/{b}") => op(
            Some("LinkOverride"),
            (200, one("LinkOverrideResult")),
            &[400, 404, 422, 500],
        ),
        ("GET", "/v1/ai/upstreams") => op(None, (200, list("Upstream")), &[404]),
        _ => None,
    }
}

/// Whether [`openapi_document`] has a full entry for the route; a route of
/// [`ROUTES`] without one is listed with only 200, 401 and 503, and the tests
/// refuse it.
pub fn is_documented(method: &str, path: &str) -> bool {
    operation(method, path).is_some()
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn describe(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "The request does not match this document: the detail names the field, the value and the fix",
        401 => "Missing or wrong bearer token",
        404 => "No such object (or route)",
        409 => "Conflicts with the current state",
        413 => "The body is larger than the API accepts",
        415 => "The body is not sent as application/json",
        422 => "The request matches this document but its values do not fit together; the detail says why",
        500 => "A bug in the controller",
        503 => "The state store or the controller cannot answer now; retry",
        _ => "",
    }
}

fn error_response(status: u16) -> Value {
    let mut r = json!({
        "description": describe(status),
        "content": {"application/json": {"schema": schema_ref("Error")}},
    });
    if status == 401 {
        r["headers"] = json!({"WWW-Authenticate": {"schema": {"type": "string"}}});
    }
    r
}

fn path_item(method: &str, path: &str, summary: &str) -> Value {
    let spec = operation(method, path);
    let mut responses = Map::new();
    let (ok_status, ok_body) = spec
        .as_ref()
        .map(|s| s.ok.clone())
        .unwrap_or((200, Answer::Json(json!({}))));
    let ok_content = match ok_body {
        Answer::Json(schema) => json!({"application/json": {"schema": schema}}),
        Answer::Text => json!({"text/plain": {"schema": {"type": "string"}}}),
        Answer::Binary => {
            json!({"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}})
        }
    };
    responses.insert(
        ok_status.to_string(),
        json!({"description": describe(ok_status), "content": ok_content}),
    );
    let errors = spec.as_ref().map(|s| s.errors).unwrap_or(&[]);
    let body = spec.as_ref().and_then(|s| s.body);
    let body_errors = if body.is_some() { BODY } else { &[] };
    for status in errors.iter().chain(body_errors).chain(&[401, 503]) {
        responses.insert(status.to_string(), error_response(*status));
    }
    let mut op = json!({"summary": summary, "responses": responses});
    let params: Vec<Value> = path
        .split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|p| json!({"name": p, "in": "path", "required": true, "schema": {"type": "string"}}))
        .collect();
    let mut params = params;
    if matches!((method, path), ("GET", "/v1/links" | "/v1/paths")) {
        params.push(json!({
            "name": "node",
            "in": "query",
            "required": false,
            "description": "Only the links or pairs with this node as an end (404 if there is no such node)",
            "schema": {"type": "string"},
        }));
    }
    if !params.is_empty() {
        op["parameters"] = Value::Array(params);
    }
    if let Some(body) = body {
        op["requestBody"] = json!({
            "required": true,
            "description": format!("JSON, at most {MAX_BODY_BYTES} bytes"),
            "content": {"application/json": {"schema": schema_ref(body)}},
        });
    }
    op
}

/// The OpenAPI 3.0 document, generated from [`ROUTES`].
pub fn openapi_document() -> Value {
    let mut paths = Map::new();
    for (method, path, summary) in ROUTES {
        if let Some(item) = paths
            .entry(path.to_string())
            .or_insert_with(|| json!({}))
            .as_object_mut()
        {
            item.insert(
                method.to_ascii_lowercase(),
                path_item(method, path, summary),
            );
        }
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "skymesh controller API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Every route needs `Authorization: Bearer <admin token>`. \
                Errors are {\"error\": code, \"detail\": sentence}. 400: the request does not \
                match this document; 422: it matches but its values do not fit together.",
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas(),
        }
    })
}

fn string(pattern: &str, max: usize) -> Value {
    json!({"type": "string", "pattern": pattern, "minLength": 1, "maxLength": max})
}

fn nullable(mut schema: Value) -> Value {
    schema["nullable"] = Value::Bool(true);
    schema
}

fn object(required: &[&str], properties: Value) -> Value {
    json!({"type": "object", "required": required, "properties": properties})
}

fn link() -> Value {
    object(
        &[
            "a",
            "b",
            "usable",
            "up",
            "reported_by",
            "weight_ms",
            "disabled",
        ],
        json!({
            "a": {"type": "string"}, "b": {"type": "string"},
            "usable": {"type": "boolean"}, "up": {"type": "boolean"},
            "rtt_ms": {"type": "number", "nullable": true},
            "jitter_ms": {"type": "number", "nullable": true},
            "loss": {"type": "number", "nullable": true},
            "reported_by": {"type": "array", "items": {"type": "string"}},
            "age_s": {"type": "number", "nullable": true},
            "cost_ms": {"type": "number", "nullable": true},
            "weight_ms": {"type": "number"},
            "disabled": {"type": "boolean"},
            "pin": {"type": "string", "nullable": true},
        }),
    )
}

fn pair() -> Value {
    object(
        &["a", "b", "primary", "reason", "since_s", "changes"],
        json!({
            "a": {"type": "string"}, "b": {"type": "string"},
            "primary": {"type": "string"},
            "primary_cost_ms": {"type": "number", "nullable": true},
            "backup": {"type": "string", "nullable": true},
            "backup_cost_ms": {"type": "number", "nullable": true},
            "reason": {"type": "string"},
            "since_s": {"type": "number"},
            "changes": {"type": "integer", "minimum": 0},
            "last_change": {"type": "string", "nullable": true},
        }),
    )
}

fn join_token(with_secret: bool) -> Value {
    let mut required = vec![
        "id",
        "name",
        "site",
        "cloud",
        "region",
        "created_at",
        "expires_at",
        "reusable",
        "revoked",
        "used_by",
        "state",
    ];
    if with_secret {
        required.push("token");
    }
    let mut t = object(
        &required,
        json!({
            "id": {"type": "string"}, "name": {"type": "string"}, "site": {"type": "string"},
            "cloud": {"type": "string"}, "region": {"type": "string"},
            "created_at": {"type": "integer", "minimum": 0, "description": "Unix seconds"},
            "expires_at": {"type": "integer", "minimum": 0, "nullable": true,
                "description": "Unix seconds; null never expires"},
            "reusable": {"type": "boolean"}, "revoked": {"type": "boolean"},
            "used_by": {"type": "array", "items": {"type": "string"}},
            "state": {"type": "string", "enum": ["valid", "used", "expired", "revoked"]},
        }),
    );
    if with_secret {
        t["properties"]["token"] =
            json!({"type": "string", "description": "The join token; shown only here"});
    }
    t
}

fn schemas() -> Value {
    let cidr = |what: &str| {
        let mut s = string(CIDR_PATTERN, CIDR_MAX_LEN);
        s["description"] = Value::String(format!(
            "{what}, e.g. \"10.0.0.0/16\" or \"fd00:1::/48\"; a shape that is no prefix, or one with host bits set, is a 422"
        ));
        s
    };
    let mut name = string(NAME_PATTERN, 63);
    name["not"] = json!({"enum": ["direct"]});
    name["description"] = json!("The node's name: a DNS label; \"direct\" is reserved");
    json!({
        "Error": {"type": "object", "required": ["error", "detail"], "properties": {
            "error": {"type": "string", "description": "a stable code, e.g. invalid_request"},
            "detail": {"type": "string", "description": "what was wrong and how to fix it"}}},
        "Health": {"type": "object", "required": ["status"], "properties": {
            "status": {"type": "string"}, "revision": {"type": "integer", "minimum": 0}}},
        "Revoked": object(&["revoked"], json!({"revoked": {"type": "string"}})),
        "Node": object(
            &["name", "site", "cloud", "region", "overlay_ip", "public_key", "endpoints",
              "advertised", "prefixes", "rejected_prefixes", "online", "last_seen",
              "enrolled_at", "agent_version", "transit"],
            json!({
                "name": {"type": "string"}, "site": {"type": "string"}, "cloud": {"type": "string"},
                "region": {"type": "string"}, "overlay_ip": {"type": "string"},
                "public_key": {"type": "string", "nullable": true},
                "endpoints": {"type": "array", "items": {"type": "string"}},
                "advertised": {"type": "array", "items": {"type": "string"}},
                "prefixes": {"type": "array", "items": {"type": "string"}},
                "rejected_prefixes": {"type": "array", "items": object(&["cidr", "reason"], json!({
                    "cidr": {"type": "string"}, "reason": {"type": "string"}}))},
                "online": {"type": "boolean"},
                "last_seen": {"type": "integer", "minimum": 0},
                "enrolled_at": {"type": "integer", "minimum": 0},
                "agent_version": {"type": "string"},
                "transit": {"type": "boolean"},
            }),
        ),
        "JoinToken": join_token(false),
        "CreatedJoinToken": join_token(true),
        "Prefix": object(&["cidr", "node", "status"], json!({
            "cidr": {"type": "string"}, "node": {"type": "string"},
            "status": {"type": "string", "enum": ["accepted", "rejected"]},
            "reason": {"type": "string"}})),
        "IpamCheckResult": object(&["cidr", "ok", "conflicts"], json!({
            "cidr": {"type": "string"}, "ok": {"type": "boolean"},
            "conflicts": {"type": "array", "items": object(&["kind", "message"], json!({
                "kind": {"type": "string", "enum": ["node", "overlay_pool", "reserved", "underlay"]},
                "message": {"type": "string"}}))}})),
        "IpamSuggestResult": object(&["cidr"], json!({"cidr": {"type": "string"}})),
        "Link": link(),
        "Pair": pair(),
        "LinkOverrideResult": object(&["override", "link", "path"], json!({
            "override": object(&["disabled"], json!({
                "disabled": {"type": "boolean"},
                "weight_ms": {"type": "number"},
                "pin": {"type": "string"}})),
            "link": nullable(link()),
            "path": nullable(pair())})),
        "Upstream": object(
            &["name", "site", "region", "base_url", "public", "models", "circuit", "up",
              "fabric_rtt_ms", "ttfb_ms"],
            json!({
                "name": {"type": "string"}, "site": {"type": "string"},
                "region": {"type": "string"}, "base_url": {"type": "string"},
                "public": {"type": "boolean"},
                "models": {"type": "array", "items": {"type": "string"}},
                "circuit": {"type": "string", "enum": ["closed", "open", "half-open"]},
                "up": {"type": "boolean"},
                "fabric_rtt_ms": {"type": "number", "nullable": true},
                "ttfb_ms": {"type": "number", "nullable": true},
            }),
        ),
        "CreateJoinToken": {
            "type": "object",
            "additionalProperties": false,
            "required": ["name", "site", "cloud", "region"],
            "properties": {
                "name": name,
                "site": string(LABEL_PATTERN, 63),
                "cloud": string(LABEL_PATTERN, 63),
                "region": string(LABEL_PATTERN, 63),
                "ttl": {
                    "type": "string", "nullable": true, "pattern": limits::ttl_pattern(),
                    "maxLength": 9,
                    "description": "A whole number of s, m, h or d from 1s to 365d, or \"never\"; null or absent is 24h",
                    "example": "24h",
                },
                "reusable": {"type": "boolean", "default": false,
                    "description": "Allow several enrollments (names get a -2, -3, ... suffix)"},
            },
        },
        "IpamCheck": {
            "type": "object", "additionalProperties": false, "required": ["cidr"],
            "properties": {"cidr": cidr("The prefix to check")},
        },
        "IpamSuggest": {
            "type": "object", "additionalProperties": false, "required": ["within", "prefix_len"],
            "properties": {
                "within": cidr("The range to search"),
                "prefix_len": {"type": "integer", "minimum": 0, "maximum": PREFIX_LEN_MAX,
                    "description": "The block's length; one that does not fit `within` is a 422"},
            },
        },
        "LinkOverride": {
            "type": "object", "additionalProperties": false,
            "description": "The empty object clears the link's override",
            "properties": {
                "disabled": {"type": "boolean", "default": false, "description": "No path may use the link"},
                "weight_ms": {"type": "number", "nullable": true, "minimum": 0, "maximum": WEIGHT_MS_MAX,
                    "description": "Cost added to the link, replacing the configured weight"},
                "pin": {"type": "string", "nullable": true, "pattern": NAME_PATTERN, "maxLength": 63,
                    "description": "\"direct\" or a third enrolled node to transit through (else a 422): the pair's path while usable"},
            },
        },
    })
}
