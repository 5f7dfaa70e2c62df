//! The rules every name in troupe follows (model, version, task, setting key, request id),
//! shared by the wire edge ([`crate::convert`]) and the replicated state machine, so a name the
//! edge lets through is one the log accepts.

/// Longest name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// Why a name is not acceptable, without echoing it (a client's string may be huge or hold
/// anything).
pub fn name_problem(value: &str) -> Option<String> {
    if value.is_empty() {
        Some("must not be empty".to_owned())
    } else if value.len() > MAX_NAME_BYTES {
        Some(format!(
            "{} bytes, the limit is {MAX_NAME_BYTES}",
            value.len()
        ))
    } else if value
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '/')
    {
        Some("may not contain whitespace, control characters or '/'".to_owned())
    } else {
        None
    }
}

/// At most this many bytes of a client's string go into a message.
pub const ECHO_BYTES: usize = 64;

/// `value` quoted for a message, cut to [`ECHO_BYTES`] (with its full length) when longer.
pub fn bounded(value: &str) -> String {
    if value.len() <= ECHO_BYTES {
        return format!("{value:?}");
    }
    let mut end = ECHO_BYTES;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &value[..end], value.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_one_rule_and_are_never_echoed_whole() {
        assert_eq!(name_problem("all-MiniLM-L6-v2"), None);
        for bad in ["", "a b", "a/b", "a\0b", &"x".repeat(MAX_NAME_BYTES + 1)] {
            let problem = name_problem(bad).unwrap();
            assert!(problem.len() < 80, "{problem}");
        }
        let long = "é".repeat(1000);
        let shown = bounded(&long);
        assert!(shown.len() < 100 && shown.contains("2000 bytes"), "{shown}");
    }
}
