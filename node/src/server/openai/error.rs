//! OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`, and the one table
//! from a gRPC code to the HTTP status (and OpenAI error type) it is answered with. OpenAI
//! clients pick their exception by the status: 404 is `NotFoundError`, 429 and 5xx are
//! retried.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tonic::Code;

/// A refused or failed request, as an OpenAI client reads it.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

/// The longest message sent back: a client string echoed in it stays bounded.
const MAX_MESSAGE_BYTES: usize = 1024;

/// The HTTP status and OpenAI error type for a gRPC code.
pub fn http_status(code: Code) -> (StatusCode, &'static str) {
    match code {
        Code::NotFound => (StatusCode::NOT_FOUND, "invalid_request_error"),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            (StatusCode::BAD_REQUEST, "invalid_request_error")
        }
        Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "authentication_error"),
        Code::PermissionDenied => (StatusCode::FORBIDDEN, "permission_error"),
        Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
        Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "server_error"),
        Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout_error"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
    }
}

impl ApiError {
    /// A status from the gRPC services, with the HTTP status its code maps to.
    pub fn from_status(status: &tonic::Status) -> Self {
        let (http, kind) = http_status(status.code());
        let code = match status.code() {
            Code::Unauthenticated => Some("invalid_api_key"),
            Code::PermissionDenied => Some("insufficient_permissions"),
            Code::ResourceExhausted => Some("rate_limit_exceeded"),
            _ => None,
        };
        Self {
            status: http,
            kind,
            message: status.message().to_owned(),
            param: None,
            code,
        }
    }

    /// A bad request field: 400, naming the field.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: Some(param),
            code: None,
        }
    }

    /// A body that is not the JSON the route takes: 400.
    pub fn malformed(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// A model no version of which is registered: 404 with OpenAI's `model_not_found`.
    pub fn model_not_found(model: &str) -> Self {
        let model = &model[..model.floor_char_boundary(128)];
        Self {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            message: format!(
                "the model '{model}' does not exist: GET /v1/models lists the models this cluster serves"
            ),
            param: Some("model"),
            code: Some("model_not_found"),
        }
    }

    pub fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    /// The JSON body, also sent as a server-sent event when a stream fails midway.
    pub fn body(&self) -> serde_json::Value {
        let mut message = self.message.as_str();
        if message.len() > MAX_MESSAGE_BYTES {
            message = &message[..message.floor_char_boundary(MAX_MESSAGE_BYTES)];
        }
        json!({
            "error": {
                "message": message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl From<tonic::Status> for ApiError {
    fn from(status: tonic::Status) -> Self {
        Self::from_status(&status)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, super::json_body(&self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_status() {
        for (code, status) in [
            (Code::NotFound, 404),
            (Code::InvalidArgument, 400),
            (Code::FailedPrecondition, 400),
            (Code::Unauthenticated, 401),
            (Code::PermissionDenied, 403),
            (Code::ResourceExhausted, 429),
            (Code::Unavailable, 503),
            (Code::DeadlineExceeded, 504),
            (Code::Internal, 500),
            (Code::Unknown, 500),
        ] {
            assert_eq!(http_status(code).0.as_u16(), status, "{code:?}");
        }
        let error = ApiError::from_status(&tonic::Status::resource_exhausted("full"));
        let body = error.body();
        assert_eq!(body["error"]["message"], "full");
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        assert!(body["error"]["param"].is_null());
        let long = "x".repeat(5000);
        assert!(ApiError::model_not_found(&long).message.len() < 300);
    }
}
