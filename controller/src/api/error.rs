//! The API's errors and the extractors that refuse requests: [`ApiError`] is
//! the one place that maps failures to status codes, and [`Json`] and [`Path`]
//! turn every refused body or path into that error shape
//! (`{"error": code, "detail": sentence}`), with the statuses the OpenAPI
//! document gives (see `openapi.rs`).

use super::MAX_BODY_BYTES;
use crate::ipam::IpamError;
use crate::registry::RegistryError;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    detail: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
        }
    }

    pub(crate) fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", detail)
    }

    /// A request that matches the OpenAPI document but whose values do not
    /// fit together (what JSON Schema cannot say).
    pub(crate) fn unprocessable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, detail = %self.detail, "API request failed");
        }
        (
            self.status,
            axum::Json(json!({"error": self.code, "detail": self.detail})),
        )
            .into_response()
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let status = match &e {
            RegistryError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            RegistryError::Invalid { .. } => (StatusCode::BAD_REQUEST, "invalid_request"),
            RegistryError::TokenRefused(_) => (StatusCode::FORBIDDEN, "token_refused"),
            RegistryError::NameTaken(_) => (StatusCode::CONFLICT, "name_taken"),
            RegistryError::PoolExhausted(_) => (StatusCode::CONFLICT, "pool_exhausted"),
            RegistryError::Busy => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            RegistryError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            RegistryError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status.0, status.1, e.to_string())
    }
}

impl From<IpamError> for ApiError {
    fn from(e: IpamError) -> Self {
        match e {
            IpamError::Exhausted { .. } => {
                ApiError::new(StatusCode::CONFLICT, "no_free_block", e.to_string())
            }
            IpamError::HostBits { .. } | IpamError::PrefixLen { .. } => {
                ApiError::unprocessable(e.to_string())
            }
        }
    }
}

const SEE_SCHEMA: &str = "see GET /v1/openapi.json for the request schema";

/// Why a request body was refused before its fields were read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyRefusal {
    /// Not sent as `application/json`: 415.
    NotJson,
    /// Over [`MAX_BODY_BYTES`]: 413.
    TooLarge,
    /// JSON, but not an object: 400.
    NotAnObject,
}

impl From<BodyRefusal> for ApiError {
    fn from(r: BodyRefusal) -> Self {
        match r {
            BodyRefusal::NotJson => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON, with `Content-Type: application/json`",
            ),
            BodyRefusal::TooLarge => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is larger than {MAX_BODY_BYTES} bytes; {SEE_SCHEMA}"),
            ),
            BodyRefusal::NotAnObject => ApiError::bad_request(format!(
                "the body must be a JSON object, {{...}}; {SEE_SCHEMA}"
            )),
        }
    }
}

/// The one place that turns a body serde refused into the API's error shape:
/// 400, naming the field and the value.
fn body_rejection(rejection: JsonRejection) -> ApiError {
    let text = rejection.body_text();
    let detail = match &rejection {
        JsonRejection::JsonDataError(_) => text
            .strip_prefix("Failed to deserialize the JSON body into the target type: ")
            .unwrap_or(&text)
            .to_string(),
        JsonRejection::JsonSyntaxError(_) => text.replace(
            "Failed to parse the request body as JSON",
            "the body is not JSON",
        ),
        _ => text,
    };
    ApiError::bad_request(format!("{detail}; {SEE_SCHEMA}"))
}

/// `Path<T>` whose rejections (a segment that is not UTF-8 once decoded) are
/// our error shape.
pub struct Path<T>(pub T);

impl<S, T> FromRequestParts<S> for Path<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Path(v))
            .map_err(|r| ApiError::bad_request(format!("path: {}", r.body_text())))
    }
}

/// `Query<T>` whose rejections (an unknown or malformed parameter) are our
/// error shape, naming the parameter.
pub struct Query<T>(pub T);

impl<S, T> FromRequestParts<S> for Query<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Query(v))
            .map_err(|r| ApiError::bad_request(format!("query: {}", r.body_text())))
    }
}

/// A request body: a JSON object sent as `application/json`, at most
/// [`MAX_BODY_BYTES`]. Serde would also read a struct from a JSON array, which
/// the document does not allow, so anything but an object is refused here.
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(BodyRefusal::NotJson.into());
        }
        let bytes = bytes::Bytes::from_request(req, state)
            .await
            .map_err(|r| match r.status() {
                StatusCode::PAYLOAD_TOO_LARGE => BodyRefusal::TooLarge.into(),
                _ => ApiError::bad_request(r.body_text()),
            })?;
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(BodyRefusal::NotAnObject.into());
        }
        axum::Json::<T>::from_bytes(&bytes)
            .map(|axum::Json(v)| Json(v))
            .map_err(body_rejection)
    }
}

/// `Content-Type: application/json` (or `application/*+json`), any parameters.
fn is_json(headers: &axum::http::HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence.starts_with("application/") && essence.ends_with("+json")
}
