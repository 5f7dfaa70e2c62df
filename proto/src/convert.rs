//! Wire messages to validated domain values: every field a server relies on is checked
//! here, once, with an error that names the field and what to change.

use crate::v1;

/// Why a wire message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("field '{field}' is required: {hint}")]
    Missing {
        field: &'static str,
        hint: &'static str,
    },
    #[error("field '{field}' is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// Longest model, version, task or request id name accepted.
pub const MAX_NAME_LENGTH: usize = crate::names::MAX_NAME_BYTES;

/// An embed request whose names are well formed and which carries at least one text.
/// Size limits (texts per request, characters per text) are server configuration and are
/// checked by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbedCall {
    pub model: String,
    pub version: Option<String>,
    pub texts: Vec<String>,
    pub task: Option<String>,
    pub request_id: Option<String>,
}

fn check_name(field: &'static str, value: &str) -> Result<(), ProtoError> {
    match crate::names::name_problem(value) {
        Some(reason) => Err(ProtoError::Invalid { field, reason }),
        None => Ok(()),
    }
}

fn optional(field: &'static str, value: String) -> Result<Option<String>, ProtoError> {
    if value.is_empty() {
        return Ok(None);
    }
    check_name(field, &value)?;
    Ok(Some(value))
}

/// The names an embed request carries: the model (required), and the version, task and
/// request id when set. Checked before anything else reads them.
pub fn check_embed_names(request: &v1::EmbedRequest) -> Result<(), ProtoError> {
    check_request_names(
        &request.model,
        &request.version,
        &request.task,
        &request.request_id,
    )
}

/// The names in a Generate request, checked as [`check_embed_names`] checks Embed's.
pub fn check_generate_names(request: &v1::GenerateRequest) -> Result<(), ProtoError> {
    check_request_names(
        &request.model,
        &request.version,
        &request.task,
        &request.request_id,
    )
}

fn check_request_names(
    model: &str,
    version: &str,
    task: &str,
    request_id: &str,
) -> Result<(), ProtoError> {
    if model.is_empty() {
        return Err(ProtoError::Missing {
            field: "model",
            hint: "name a registered model, e.g. all-MiniLM-L6-v2 or smollm2-135m",
        });
    }
    check_name("model", model)?;
    for (field, value) in [
        ("version", version),
        ("task", task),
        ("request_id", request_id),
    ] {
        if !value.is_empty() {
            check_name(field, value)?;
        }
    }
    Ok(())
}

impl TryFrom<v1::EmbedRequest> for EmbedCall {
    type Error = ProtoError;

    fn try_from(request: v1::EmbedRequest) -> Result<Self, Self::Error> {
        if request.model.is_empty() {
            return Err(ProtoError::Missing {
                field: "model",
                hint: "name a registered model, e.g. all-MiniLM-L6-v2",
            });
        }
        check_name("model", &request.model)?;
        if request.texts.is_empty() {
            return Err(ProtoError::Missing {
                field: "texts",
                hint: "send at least one text",
            });
        }
        Ok(Self {
            model: request.model,
            version: optional("version", request.version)?,
            texts: request.texts,
            task: optional("task", request.task)?,
            request_id: optional("request_id", request.request_id)?,
        })
    }
}

impl From<(Vec<Vec<f32>>, String, u64, String)> for v1::EmbedResponse {
    /// `(embeddings, model_version, revision, request_id)`.
    fn from(
        (embeddings, model_version, revision, request_id): (Vec<Vec<f32>>, String, u64, String),
    ) -> Self {
        Self {
            embeddings: embeddings
                .into_iter()
                .map(|values| v1::Embedding { values })
                .collect(),
            model_version,
            revision,
            request_id,
            served_by: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn request() -> v1::EmbedRequest {
        v1::EmbedRequest {
            model: "all-MiniLM-L6-v2".into(),
            version: String::new(),
            texts: vec!["hello".into()],
            task: "search".into(),
            request_id: String::new(),
            routing_key: String::new(),
        }
    }

    #[test]
    fn a_well_formed_request_converts_with_empty_fields_as_none() {
        let call = EmbedCall::try_from(request()).unwrap();
        assert_eq!(call.version, None);
        assert_eq!(call.task.as_deref(), Some("search"));
        assert_eq!(call.request_id, None);
    }

    #[test]
    fn missing_model_or_texts_name_the_field() {
        let mut r = request();
        r.model.clear();
        assert!(EmbedCall::try_from(r)
            .unwrap_err()
            .to_string()
            .contains("'model'"));
        let mut r = request();
        r.texts.clear();
        assert!(EmbedCall::try_from(r)
            .unwrap_err()
            .to_string()
            .contains("'texts'"));
    }

    #[test]
    fn names_with_whitespace_or_overlong_are_invalid() {
        let mut r = request();
        r.task = "bad task".into();
        assert!(matches!(
            EmbedCall::try_from(r),
            Err(ProtoError::Invalid { field: "task", .. })
        ));
        let mut r = request();
        r.version = "v".repeat(MAX_NAME_LENGTH + 1);
        assert!(matches!(
            EmbedCall::try_from(r),
            Err(ProtoError::Invalid {
                field: "version",
                ..
            })
        ));
    }

    #[test]
    fn garbage_bytes_decode_to_an_error_not_a_panic() {
        let garbage = [0xffu8, 0xff, 0xff, 0xff, 0x0f, 0x12, 0x99];
        assert!(v1::EmbedRequest::decode(&garbage[..]).is_err());
        let bytes = request().encode_to_vec();
        assert_eq!(
            v1::EmbedRequest::decode(bytes.as_slice()).unwrap(),
            request()
        );
    }

    #[test]
    fn the_descriptor_set_is_embedded() {
        assert!(!crate::FILE_DESCRIPTOR_SET.is_empty());
    }
}
